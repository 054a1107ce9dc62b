"""Workdir file access for local paths and object-store URLs (gs://bucket/run).

A multi-host TPU slice needs a run directory every host can reach and that outlives
the slice: a Cloud Storage bucket. Orbax writes checkpoints there natively; this
module gives the rest of the trainer (metrics.jsonl, config.json, the model
source, the HF export) the few operations it needs, through `etils.epath` for
URLs (gs:// needs `gcsfs`, which Cloud TPU images ship; `pip install gcsfs`
elsewhere) and plain `os`/`open` for local paths.

Object stores have no append: `append_text` rewrites the object, fine for a
metrics file written every few steps. Tools that only write local directories
(safetensors, tokenizers) write into `staged_dir`, which uploads on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _epath(path: str):
    from etils import epath  # pylint: disable=import-outside-toplevel
    return epath.Path(path)


def resolve(path: str) -> str:
    """An absolute local path, or the URL unchanged."""
    return str(path).rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return os.path.join(base, *parts)


def makedirs(path: str) -> None:
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


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
        makedirs(path)
        for name in sorted(os.listdir(local)):
            _epath(os.path.join(local, name)).copy(_epath(join(path, name)), overwrite=True)
    finally:
        shutil.rmtree(local, ignore_errors=True)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local directory holding the files of `path` (downloaded first for a URL)."""
    if not is_remote(path):
        yield path
        return
    local = tempfile.mkdtemp(prefix="kto_jax_fetch_")
    try:
        for child in _epath(path).iterdir():
            child.copy(_epath(os.path.join(local, child.name)), overwrite=True)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)
