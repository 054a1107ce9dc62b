"""Prepared data sets: tokenise once (`kto-jax data prepare`), then each process reads only its rows.

Without preparation every process reads and normalises the whole data file (JSONL
and JSON have no random access) and tokenises its 1/n share at start-up, so start-up
time and host memory grow with the data set. `prepare` does that work once, in one
process, with exactly the checks and errors of a training run (`kto_jax/data/prepare.py`
calls the same `pipeline.read_splits`), and writes a directory (format `VERSION` 2):

  DIR/prepared.json               the data settings and tokenizer it was made with, the
                                  format, per split what the summary reports (rows read,
                                  examples, subsampling, drops and truncations) and its
                                  file layout (examples, dtypes, a constant weight/label)
  DIR/<split>/prompt_lengths.npy  per kept example (.npy, smallest unsigned dtype that
  DIR/<split>/side_lengths.npy    holds data.max_length): prompt length; [sides, N]
                                  completion lengths (chosen, rejected for pairs)
  DIR/<split>/label.npy           bool [N], desirable (the file keeps TRL's column name);
                                  weight.npy f32 [N]; token_hash.npy uint32 [N]
  DIR/<split>/weight.npy          (the CRC of each example's ids, for the data fingerprint)
  DIR/<split>/token_hash.npy
  DIR/<split>/offsets.npy         int64 [N / BLOCK + 1]: token position of every BLOCK-th example
  DIR/<split>/tokens.bin          every kept example's ids, concatenated: prompt, then each
                                  side (uint16 when the vocabulary fits, else int32)

for split in train and (when the config makes one) eval. An example's position in
tokens.bin is its block's offset plus the lengths of the examples before it in the
block, so no per-example index is stored or held: a reader needs only the lengths it
holds anyway for planning. Training with `data.train_path=DIR` loads the lengths and
labels (every process plans every batch, as before, without an all-gather), hashes
token_hash and weight in chunks for the fingerprint without keeping them, and reads
only the token ranges of its own rows of each batch: positioned reads of a local
file, or concurrent ranged GETs of the object on gs:// (`fs.read_ranges`), so a
prepared directory in a bucket is read in place. Batches, the summary and the data
fingerprint are the same as from the original file, so a run may switch between the
two and resume exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from typing import Any, Iterator

import numpy as np

from kto_jax import fs
from kto_jax.data import tokenize
from kto_jax.data.settings import DataSettings
from kto_jax.data.shards import RowTokens, SplitData
from kto_jax.errors import UserError

META_FILE = "prepared.json"
TOKENS_FILE = "tokens.bin"
VERSION = 2
BLOCK = 1024        # examples per entry of offsets.npy
LABEL_COLUMN = "label"   # the desirable column's file name (label.npy), as in format VERSION 2
_FORMATS = {1: "ArrayRecord token records and stats.npz"}   # earlier versions, for the refusal
# The config.data fields a prepared directory depends on (besides train_path itself).
SETTINGS = ("format", "eval_path", "eval_fraction", "train_split", "eval_split", "seed",
            "score_threshold", "score_weighting", "one_y_per_x", "desirable_fraction",
            "undesirable_fraction", "max_length", "max_prompt_length", "max_completion_length",
            "on_overlong", "on_prefix_mismatch")


def is_prepared(path: str) -> bool:
    """Is `path` a directory written by `prepare`?"""
    return bool(path) and fs.isfile(fs.join(path, META_FILE))


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what tokenization depends on: vocabulary, pre/post-processing, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    h = hashlib.sha256(vocab.encode())
    h.update(repr((getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id,
                   tokenizer.eos_token_id, tokenizer.pad_token_id)).encode())
    return h.hexdigest()[:16]


def settings(d: DataSettings, tokenizer) -> dict[str, Any]:
    """What a prepared directory was made with: the data settings of SETTINGS, the loss
    kind (paired or not) and the tokenizer's fingerprint."""
    out = {key: getattr(d, key) for key in SETTINGS}
    out["paired"], out["tokenizer"] = d.paired, tokenizer_fingerprint(tokenizer)
    return json.loads(json.dumps(out))   # tuples -> lists, as read back


def length_dtype(max_length: int) -> np.dtype:
    """The smallest unsigned dtype that holds every kept length and an example's total.

    Each length is <= data.max_length and prompt + completion <= max_length, so a pair's
    prompt + chosen + rejected (`total_lengths`, summed in this dtype) is < 2 * max_length.
    """
    return np.dtype(np.uint16 if 2 * max_length < 2 ** 16 else np.uint32)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 ids when the vocabulary fits (half the bytes to read), else int32."""
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.int32)


class SplitWriter:
    """Writes one prepared split, a chunk of kept examples at a time (`add`, then `close`).

    Tokens go to tokens.bin as they come; only the per-example statistics (a few bytes
    each) are held until `close` writes them as .npy files.
    """

    def __init__(self, directory: str, *, max_length: int, vocab_size: int, sides: int):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.sides = directory, sides
        self.vocab_size, self.tokens_dtype = vocab_size, token_dtype(vocab_size)
        lengths = length_dtype(max_length)
        self._dtypes = {"prompt_lengths": lengths, "side_lengths": lengths,
                        LABEL_COLUMN: np.dtype(bool), "weight": np.dtype(np.float32),
                        "token_hash": np.dtype(np.uint32)}
        # Open across add() calls until close()/abort(), so not a with-block.
        self._tokens = open(  # pylint: disable=consider-using-with
            os.path.join(directory, TOKENS_FILE), "wb")
        self._columns: dict[str, list[np.ndarray]] = {
            "prompt_lengths": [], "side_lengths": [], LABEL_COLUMN: [], "weight": [],
            "token_hash": []}
        self._offsets: list[np.ndarray] = []
        self.examples = self.tokens = 0

    def add(self, prompts: tokenize.Ragged, sides: tuple[tokenize.Ragged, ...],
            desirable: np.ndarray, weight: np.ndarray, token_hash: np.ndarray) -> None:
        """Appends examples: their prompt and side ids (`Ragged`, one entry per example)."""
        n = len(prompts)
        lengths = np.stack([prompts.lengths, *(s.lengths for s in sides)])   # [1 + sides, n]
        ids = _interleave([prompts, *sides], lengths)
        if len(ids) and not 0 <= ids.min() <= ids.max() <= np.iinfo(self.tokens_dtype).max:
            raise RuntimeError(f"token ids in [{ids.min()}, {ids.max()}] do not fit "
                               f"{self.tokens_dtype.name} (the tokenizer has {self.vocab_size} "
                               "ids)")
        self._tokens.write(ids.astype(self.tokens_dtype).tobytes())
        totals = lengths.sum(0, dtype=np.int64)
        # token positions of the chunk's examples whose global index is a multiple of BLOCK
        firsts = np.arange(-self.examples % BLOCK, n, BLOCK)
        self._offsets.append(self.tokens + np.concatenate([[0], np.cumsum(totals)])[firsts])
        for key, value in (("prompt_lengths", lengths[0]), ("side_lengths", lengths[1:]),
                           (LABEL_COLUMN, desirable), ("weight", weight),
                           ("token_hash", token_hash)):
            self._columns[key].append(np.asarray(value).astype(self._dtypes[key]))
        self.examples += n
        self.tokens += int(totals.sum())

    def abort(self) -> None:
        """Closes tokens.bin without writing the statistics (the caller removes the directory)."""
        self._tokens.close()

    def close(self) -> dict[str, Any]:
        """Writes the statistics; returns the split's layout for prepared.json."""
        self._tokens.close()
        columns = {}
        for key, parts in self._columns.items():
            axis = 1 if key == "side_lengths" else 0
            empty = np.zeros((self.sides, 0) if axis else (0,), self._dtypes[key])
            columns[key] = np.concatenate([empty, *parts], axis=axis)
            np.save(os.path.join(self.directory, key + ".npy"), columns[key])
        offsets = np.concatenate([*self._offsets, [self.tokens]]).astype(np.int64)
        np.save(os.path.join(self.directory, "offsets.npy"), offsets)
        weight, label = columns["weight"], columns[LABEL_COLUMN]
        return {"examples": self.examples, "tokens": self.tokens, "block": BLOCK,
                "token_dtype": self.tokens_dtype.name,
                "constant_weight": float(weight[0]) if len(weight) and (weight == weight[0]).all()
                else None,
                "constant_label": bool(label[0]) if len(label) and (label == label[0]).all()
                else None}


def _interleave(parts: list[tokenize.Ragged], lengths: np.ndarray) -> np.ndarray:
    """Per example, its ids from each part in turn, concatenated (no loop over examples)."""
    totals = lengths.sum(0)
    out = np.empty(int(totals.sum()), np.int32)
    starts = np.concatenate([[0], np.cumsum(totals)[:-1]]).astype(np.int64)
    for k, part in enumerate(parts):
        # token j of example i goes to starts[i] + (lengths of the earlier parts) + j
        shift = starts + lengths[:k].sum(0) - part.offsets[:-1]
        out[np.repeat(shift, part.lengths) + np.arange(len(part.flat))] = part.flat
    return out


class NpyColumn:
    """A 1-D .npy file (local or gs://) read in chunks, never held whole (for hashing)."""

    def __init__(self, path: str):
        self.path = path

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        with fs.open_file(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            (n,), _, dtype = read_header(f)
            for start in range(0, n, size):
                count = min(size, n - start)
                yield np.frombuffer(_read_exactly(f, count * dtype.itemsize, self.path), dtype)


def _read_exactly(f, size: int, path: str) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise UserError(f"{path} is shorter than its header says; run `kto-jax data prepare` "
                        "again.")
    return data


def _load(path: str) -> np.ndarray:
    """A whole .npy file (local, or fetched with one read for a URL)."""
    if fs.is_remote(path):
        return np.load(io.BytesIO(fs.read_bytes(path)))
    return np.load(path)


class PreparedSplit(tokenize.SplitLengths):
    """A prepared split: lengths and labels in memory, tokens read by row on demand.

    The batching interface of `shards.ShardedSplit` (lengths, desirable, weight,
    token_hash, paired, row_tokens). A constant weight or label (unweighted data;
    pairs) is a zero-stride array, token_hash an `NpyColumn` hashed in chunks.
    `rows_read` counts the examples this process read, `bytes_read` their bytes.
    """

    def __init__(self, directory: str, layout: dict[str, Any]):
        self.directory = directory
        n = layout["examples"]
        self.prompt_lengths = _load(fs.join(directory, "prompt_lengths.npy"))
        self.side_lengths = tuple(_load(fs.join(directory, "side_lengths.npy")))
        self.desirable = _column(directory, LABEL_COLUMN, layout["constant_label"], bool, n)
        self.weight = _column(directory, "weight", layout["constant_weight"], np.float32, n)
        self.token_hash = NpyColumn(fs.join(directory, "token_hash.npy"))
        self.offsets = _load(fs.join(directory, "offsets.npy"))
        self.block, self.token_dtype = layout["block"], np.dtype(layout["token_dtype"])
        self.rows_read = self.bytes_read = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def __getstate__(self) -> dict:   # grain worker processes get their own lock
        state = dict(self.__dict__)
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def token_spans(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) in tokens.bin, in tokens, of each example id (int64 [len(ids)]).

        start = the block's offset + the total lengths of the block's earlier examples.
        """
        starts = np.empty(len(ids), np.int64)
        for j, i in enumerate(ids):
            lo = int(i) - int(i) % self.block
            starts[j] = self.offsets[lo // self.block] + self._total(lo, int(i))
        lengths = self.prompt_lengths[ids].astype(np.int64)
        for side in self.side_lengths:
            lengths += side[ids]
        return starts, lengths

    def _total(self, lo: int, hi: int) -> int:
        return int(self.prompt_lengths[lo:hi].sum(dtype=np.int64)
                   + sum(int(side[lo:hi].sum(dtype=np.int64)) for side in self.side_lengths))

    def row_tokens(self, rows: np.ndarray) -> RowTokens:
        """Tokens of the example ids in `rows` (any shape), each example's range read once."""
        ids = np.unique(rows)
        starts, lengths = self.token_spans(ids)
        size = self.token_dtype.itemsize
        path = fs.join(self.directory, TOKENS_FILE)
        data = fs.read_ranges(path, starts * size, (starts + lengths) * size)
        with self._lock:
            self.rows_read += len(ids)
            self.bytes_read += int(lengths.sum()) * size
        prompts, completions = {}, tuple({} for _ in self.side_lengths)
        for i, raw, total in zip(ids, data, lengths):
            if len(raw) != total * size:
                raise UserError(f"{path} is shorter than its statistics say; run `kto-jax data "
                                "prepare` again.")
            values = np.frombuffer(raw, self.token_dtype).astype(np.int32)
            end = int(self.prompt_lengths[i])
            prompts[int(i)] = values[:end]
            for s, side in enumerate(self.side_lengths):
                completions[s][int(i)] = values[end:end + int(side[i])]
                end += int(side[i])
        return RowTokens(prompts, completions, self.desirable, self.weight, self.paired)


def _column(directory: str, name: str, constant, dtype, n: int) -> np.ndarray:
    """A per-example column: zero-stride when constant (no bytes per row), else loaded."""
    if constant is not None:
        return np.broadcast_to(np.asarray(constant, dtype), (n,))
    return _load(fs.join(directory, name + ".npy"))


def open_splits(d: DataSettings, tokenizer) -> tuple[str, bool, dict[str, SplitData], str]:
    """`pipeline.read_splits` for a prepared directory: checks its settings, loads statistics.

    Raises:
      UserError: the directory was prepared by another format version, or with other
        data settings, loss kind or tokenizer.
    """
    path = d.train_path
    meta = json.loads(fs.read_text(fs.join(path, META_FILE)))
    version = meta.get("version")
    if version != VERSION:
        what = f" ({_FORMATS[version]})" if version in _FORMATS else ""
        raise UserError(f"data.train_path={path!r} was written by `kto-jax data prepare` in "
                        f"format version {version}{what}; this kto-jax reads version {VERSION}. "
                        f"Re-run `kto-jax data prepare --out={path}` on the original data "
                        "(same config).")
    want, have = settings(d, tokenizer), meta["settings"]
    diff = [key for key in want if want[key] != have.get(key)]
    if diff:
        shown = "; ".join(f"{_label(k)}: prepared {have.get(k)!r}, config {want[k]!r}"
                          for k in diff)
        raise UserError(f"data.train_path={path!r} was prepared with other settings ({shown}); "
                        "run `kto-jax data prepare` again with this config, or train with the "
                        "settings it was prepared with.")
    splits = {}
    for name, info in meta["splits"].items():
        report = tokenize.TokenReport(**info["report"])
        splits[name] = SplitData(name, PreparedSplit(fs.join(path, name), info["layout"]),
                                 info["source"], info["rows"], info["examples"],
                                 info["subsampled"], report)
    return meta["format"], meta["conversational"], splits, meta["eval_note"]


def _label(key: str) -> str:
    return {"paired": "paired loss", "tokenizer": "tokenizer"}.get(key, f"data.{key}")
