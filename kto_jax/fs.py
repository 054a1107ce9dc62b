"""Files on local paths and in object stores (gs://bucket/...): the one path abstraction.

A multi-host TPU slice keeps its run directory, model and data in Cloud Storage, which
every host reaches and which outlives the slice. Everything kto-jax reads or writes
outside Orbax (config.json, metrics.jsonl, the workdir's model source, the HF export,
model.path's config/tokenizer/safetensors, the data files) goes through this module:
`etils.epath` for URLs (gs:// needs `gcsfs`: `pip install 'kto-jax[gcs]'`) and plain
`os`/`open` for local paths. Orbax writes checkpoints to URLs itself (TensorStore).

Object stores have no append: `append_text` rewrites the object, fine for a metrics
file written every few steps. Tools that only write local directories (safetensors,
tokenizers) write into `staged_dir`, which uploads on exit; tools that only read
local directories (transformers' tokenizer loader, `datasets.load_from_disk`) read
from `local_copy`.

A local GCS emulator (tests, or offline development) is named by STORAGE_EMULATOR_HOST,
which gcsfs and google-cloud-storage honour; TensorStore's GCS driver (Orbax's array
writes) has its own endpoint variable, TENSORSTORE_GCS_HTTP_URL, and needs a bearer
token, so both are set from STORAGE_EMULATOR_HOST when this module is imported.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
import threading
from typing import IO, Iterator

from kto_jax.errors import UserError


def _configure_emulator() -> None:
    """Points TensorStore (and gcsfs' bucket probe) at STORAGE_EMULATOR_HOST, if set."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    url = host if "://" in host else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # any token will do
    # gcsfs would ask the real GCS control API (no emulator) for each bucket's type.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_configure_emulator()


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _epath(path: str):
    try:
        from etils import epath  # pylint: disable=import-outside-toplevel
        if str(path).startswith("gs://"):
            import gcsfs  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as err:
        raise UserError(f"{path}: reading and writing {str(path).split('://')[0]}:// paths needs "
                        f"the gcs extra ({err}); pip install 'kto-jax[gcs]'.") from None
    return epath.Path(path)


def resolve(path: str) -> str:
    """An absolute local path, or the URL unchanged."""
    return str(path).rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return os.path.join(base, *parts)


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(path)


def makedirs(path: str) -> None:
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """Names of the entries of a directory, sorted."""
    if is_remote(path):
        return sorted(child.name for child in _epath(path).iterdir())
    return sorted(os.listdir(path))


def open_file(path: str, mode: str = "rb") -> IO:
    """A file object (seekable for reading, also for URLs: ranged reads)."""
    if is_remote(path):
        return _epath(path).open(mode)
    return open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))  # pylint: disable=consider-using-with


def read_ranges(path: str, starts, ends) -> list[bytes]:
    """The bytes [start, end) of the file `path` for each pair, in order.

    A local file: one positioned read (`os.pread`) per range. A URL: fsspec's
    `cat_ranges`, which gcsfs sends as concurrent ranged GETs of the object, so a
    reader fetches only those bytes, never the whole object and with no local copy.
    """
    starts, ends = [int(s) for s in starts], [int(e) for e in ends]
    if not is_remote(path):
        with open(path, "rb") as f:
            return [os.pread(f.fileno(), e - s, s) if e > s else b"" for s, e in zip(starts, ends)]
    _epath(path)   # the gcs extra's check
    import fsspec  # pylint: disable=import-outside-toplevel
    filesystem, name = fsspec.core.url_to_fs(path)
    wanted = [k for k, (s, e) in enumerate(zip(starts, ends)) if e > s]
    out = [b""] * len(starts)
    if wanted:
        got = filesystem.cat_ranges([name] * len(wanted), [starts[k] for k in wanted],
                                    [ends[k] for k in wanted], on_error="raise")
        for k, data in zip(wanted, got):
            out[k] = data
    return out


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    if is_remote(path):
        return _epath(path).read_text()
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Writes `text` whole (via a temporary file and a rename where the path is local)."""
    if is_remote(path):
        _epath(path).write_text(text)
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def append_text(path: str, text: str) -> None:
    if is_remote(path):
        write_text(path, (read_text(path) if exists(path) else "") + text)
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def default_file_mode(directory: str) -> int:
    """The mode a file created in `directory` by a plain `open` gets: 0o666 less the umask.

    Read from a probe file (os.umask, to read the mask, would change it for every thread)."""
    probe = os.path.join(directory, f".mode-probe-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        os.unlink(probe)


def share_like_open(directory: str) -> None:
    """Gives every file under the local `directory` the mode `open` would have given it.

    safetensors writes its files 0o600 (readable by their owner only); transformers'
    own checkpoints, and the rest of an export, get the umask's mode (usually 0o644).
    """
    mode = default_file_mode(directory)
    for folder, _, files in os.walk(directory):
        for name in files:
            os.chmod(os.path.join(folder, name), mode)


def upload_tree(local: str, path: str) -> None:
    """Copies the local directory `local` (recursively) to the directory `path`."""
    makedirs(path)
    for name in sorted(os.listdir(local)):
        source = os.path.join(local, name)
        if os.path.isdir(source):
            upload_tree(source, join(path, name))
        elif is_remote(path):
            _epath(source).copy(_epath(join(path, name)), overwrite=True)
        else:
            shutil.copyfile(source, join(path, name))


def download_tree(path: str, local: str, exclude: tuple[str, ...] = ()) -> None:
    """Copies the directory `path` (recursively) into `local`, skipping names matching `exclude`."""
    os.makedirs(local, exist_ok=True)
    for child in _epath(path).iterdir():
        if any(fnmatch.fnmatch(child.name, pattern) for pattern in exclude):
            continue
        if child.is_dir():
            download_tree(str(child), os.path.join(local, child.name), exclude)
        else:
            child.copy(_epath(os.path.join(local, child.name)), overwrite=True)


@contextlib.contextmanager
def staged_dir(path: str) -> Iterator[str]:
    """A local directory to write into; for a URL, its files are uploaded to `path` on exit."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    local = tempfile.mkdtemp(prefix="kto_jax_stage_")
    try:
        yield local
        upload_tree(local, path)
    finally:
        shutil.rmtree(local, ignore_errors=True)


@contextlib.contextmanager
def local_copy(path: str, exclude: tuple[str, ...] = ()) -> Iterator[str]:
    """A local directory holding the files of `path` (downloaded first for a URL).

    `exclude`: glob patterns of names not to download (e.g. weights, read elsewhere).
    """
    if not is_remote(path):
        yield path
        return
    local = tempfile.mkdtemp(prefix="kto_jax_fetch_")
    try:
        download_tree(path, local, exclude)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)
