"""Read feedback records from JSONL, JSON, Parquet, `datasets` directories or hub ids.

Every reader returns a `RowSet`: the records as plain dicts plus where each came
from (`file.jsonl:12`, `file.parquet row 3`), so later validation errors point at
the exact line. Nothing here knows about formats or tokens; bad bytes and bad
JSON are reported as file:line `UserError`s, all of them at once (up to a limit).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from kto_jax import fs
from kto_jax.errors import UserError

MAX_LISTED_PROBLEMS = 20
_UTF8_BOM = b"\xef\xbb\xbf"
# Byte-order marks of encodings other than UTF-8 (Notepad's "Unicode", PowerShell's default).
_OTHER_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32",
               b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
             ".pq": "parquet"}


@dataclasses.dataclass
class RowSet:
    """Records of one source, in file order.

    Attributes:
      source: the path or hub id as the user gave it.
      kind: "jsonl" | "json" | "parquet" | "datasets" | "hub".
      records: one dict per row.
      lines: JSONL line number of each record (1-based), or None when rows are
        addressed by position.
    """
    source: str
    kind: str
    records: list[dict]
    lines: list[int] | None = None

    def where(self, i: int) -> str:
        """Human location of record i: `path:LINE` for JSONL, `path row N` otherwise."""
        if self.lines is not None:
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source} row {i + 1}"

    @property
    def columns(self) -> list[str]:
        """Union of the record keys, in first-seen order."""
        seen: dict[str, None] = {}
        for record in self.records:
            for key in record:
                seen.setdefault(key, None)
        return list(seen)

    def subset(self, indices) -> "RowSet":
        """The rows at `indices` (kept in the given order), locations preserved."""
        indices = [int(i) for i in indices]
        lines = None if self.lines is None else [self.lines[i] for i in indices]
        return RowSet(self.source, self.kind, [self.records[i] for i in indices], lines)


class Problems:
    """Collects per-row problems so one `UserError` can list them all."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.count = 0

    def add(self, where: str, message: str) -> None:
        self.count += 1
        if len(self.items) < MAX_LISTED_PROBLEMS:
            self.items.append(f"  {where}: {message}")

    def raise_if_any(self, header: str) -> None:
        if not self.count:
            return
        more = self.count - len(self.items)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise UserError(f"{header} ({self.count} problem{'s' * (self.count > 1)}):\n"
                        + "\n".join(self.items) + tail)


def read_rows(path: str, *, split: str = "train", config_key: str = "data.train_path") -> RowSet:
    """Reads every record of a local file, a `save_to_disk` directory or a hub dataset.

    Args:
      path: JSONL / JSON / Parquet file, a `datasets` directory (local or gs://), or a hub id
        (loaded with `datasets.load_dataset` only when it is not a local path).
      split: split to take from a DatasetDict directory or a hub id.
      config_key: the config field that named `path`, for error messages.

    Raises:
      UserError: missing file, unreadable or malformed content (with file:line).
    """
    if not path:
        raise UserError(f"{config_key} is empty: set it to a JSONL, JSON or Parquet file, a "
                        "datasets directory, or a Hugging Face hub dataset id.")
    if fs.isdir(path):
        return _read_datasets_dir(path, split, config_key)
    if fs.isfile(path):
        kind = _file_kind(path, config_key)
        reader = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet}[kind]
        return reader(path)
    if _looks_like_hub_id(path):
        return _read_hub(path, split, config_key)
    raise UserError(f"{config_key}: no such file or directory: {path!r}. Give a JSONL, JSON "
                    "or Parquet file, a datasets save_to_disk directory, or a hub id.")


def _file_kind(path: str, config_key: str) -> str:
    for suffix, kind in _SUFFIXES.items():
        if path.lower().endswith(suffix):
            return kind
    raise UserError(f"{config_key}: cannot tell the file type of {path!r} from its name; use one "
                    f"of the suffixes {', '.join(_SUFFIXES)}.")


def _looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and not path.startswith(".") and not any(
        path.lower().endswith(s) for s in _SUFFIXES)


def _check_encoding(path: str, head: bytes) -> None:
    """UserError for a file that starts with a UTF-16/32 byte-order mark (not UTF-8)."""
    for bom, name in _OTHER_BOMS.items():
        if head.startswith(bom):
            raise UserError(f"{path}: the file is {name} (it starts with the byte-order mark "
                            f"{bom.hex(' ').upper()}); save it as UTF-8.")


def _read_jsonl(path: str) -> RowSet:
    """One JSON object per line; a UTF-8 byte-order mark, CRLF line ends and blank lines
    are accepted; errors name path:line."""
    records, lines, problems = [], [], Problems()
    with fs.open_file(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                _check_encoding(path, raw)
            raw = raw.removeprefix(_UTF8_BOM)  # also where files with marks were concatenated
            if not raw.strip():
                continue
            if not records and not problems.count and raw.lstrip().startswith(b"["):
                raise UserError(f"{path}: the file starts with a JSON array, not one JSON object "
                                "per line (JSON Lines); rename it to .json or write one object "
                                "per line.")
            record = _parse_line(raw, f"{path}:{lineno}", problems)
            if record is not None:
                records.append(record)
                lines.append(lineno)
    problems.raise_if_any(f"{path}: unreadable lines")
    return RowSet(path, "jsonl", records, lines)


def _parse_line(raw: bytes, where: str, problems: Problems) -> dict | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        problems.add(where, f"invalid UTF-8 at byte {err.start} of the line ({err.reason}); "
                            "re-encode the file as UTF-8")
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        problems.add(where, f"invalid JSON: {err.msg} at column {err.colno}")
        return None
    if not isinstance(value, dict):
        problems.add(where, f"expected a JSON object per line, got {type(value).__name__}")
        return None
    return value


def _read_json(path: str) -> RowSet:
    """A JSON list of objects, or an object of equal-length columns (UTF-8, with or
    without a byte-order mark)."""
    data = fs.read_bytes(path)
    _check_encoding(path, data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 ({err.reason}); re-encode the file as "
                        "UTF-8.") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty; it should hold a JSON list of objects.")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and _first_line_is_object(text):
            raise UserError(f"{path}: the file holds one JSON object per line (JSON Lines), "
                            "not one JSON value; rename it to .jsonl.") from None
        raise UserError(f"{path}:{err.lineno}: invalid JSON: {err.msg} at column {err.colno}"
                        ) from None
    return RowSet(path, "json", _json_records(value, path))


def _first_line_is_object(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _json_records(value, path: str) -> list[dict]:
    if isinstance(value, list):
        bad = [i for i, v in enumerate(value) if not isinstance(v, dict)]
        if bad:
            raise UserError(f"{path}: record {bad[0] + 1} is a {type(value[bad[0]]).__name__}; "
                            "a JSON file must hold a list of objects.")
        return value
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        sizes = {k: len(v) for k, v in value.items()}
        if len(set(sizes.values())) != 1:
            raise UserError(f"{path}: columns have different lengths {sizes}.")
        n = next(iter(sizes.values()))
        return [{k: value[k][i] for k in value} for i in range(n)]
    raise UserError(f"{path}: expected a JSON list of objects or an object of equal-length "
                    f"column lists, got {type(value).__name__}.")


def _read_parquet(path: str) -> RowSet:
    import pyarrow  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    try:
        with fs.open_file(path, "rb") as f:
            table = pq.read_table(f)
    except (pyarrow.ArrowException, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet file: {err}") from None
    return RowSet(path, "parquet", table.to_pylist())


def _read_datasets_dir(path: str, split: str, config_key: str) -> RowSet:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any(fs.exists(fs.join(path, m)) for m in markers):
        raise UserError(f"{config_key}: {path!r} is a directory but not a datasets "
                        "save_to_disk directory (no dataset_info.json / dataset_dict.json); "
                        "point at a file instead.")
    import datasets  # pylint: disable=import-outside-toplevel
    try:
        with fs.local_copy(path) as local:
            loaded = datasets.load_from_disk(local, keep_in_memory=fs.is_remote(path))
    except Exception as err:  # datasets raises many types; all mean "unreadable"
        raise UserError(f"{config_key}: cannot load datasets directory {path!r}: {err}") from None
    return RowSet(path, "datasets", _dataset_records(loaded, path, split, config_key))


def _dataset_records(loaded, source: str, split: str, config_key: str) -> list[dict]:
    import datasets  # pylint: disable=import-outside-toplevel
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{config_key}: {source!r} has splits {sorted(loaded)}, not "
                            f"{split!r}; set data.train_split / data.eval_split.")
        loaded = loaded[split]
    return loaded.to_list()


def _read_hub(path: str, split: str, config_key: str) -> RowSet:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get(
            "HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        raise UserError(f"{config_key}: {path!r} is not a local file or directory, and the hub "
                        "is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set).")
    import datasets  # pylint: disable=import-outside-toplevel
    try:
        loaded = datasets.load_dataset(path, split=split)
    except Exception as err:  # network, auth, missing split: all reported the same way
        raise UserError(f"{config_key}: {path!r} is not a local path and could not be loaded "
                        f"from the hub (split {split!r}): {err}") from None
    return RowSet(path, "hub", _dataset_records(loaded, path, split, config_key))
