"""What a checkpoint fault looks like to the user: one line, a directory set aside, nothing lost.

Orbax and TensorStore report a damaged checkpoint or a failed write as long,
nested exceptions (a TensorStore spec of 150 lines) and log each background
thread's failure with its own traceback. This module turns them into one line
naming the directory and the cause, moves an unreadable step directory out of the
manager's view (`<step>.corrupt-<time>`, never deleted), removes the temporary
directory of a failed save, and measures what a checkpoint needs on disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from typing import Any

import jax

from kto_jax import console
from kto_jax import fs as paths

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax writes step N to N.orbax-checkpoint-tmp*, then renames
_NO_SPACE = ("no space left", "resource_exhausted", "disk quota")
_NO_PERMISSION = ("permission denied", "permission_denied", "read-only file system", "operation not permitted")


def one_line(err: BaseException, limit: int = 240) -> str:
    """The innermost cause of `err` as one short line (TensorStore specs cut off)."""
    while err.__cause__ is not None and str(err.__cause__):
        err = err.__cause__
    text = str(err).split("See full TensorStore details")[0]
    line = " ".join(text.split()).rstrip(" .;:") or type(err).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def save_failure_reason(err: BaseException) -> str:
    """'disk full', 'permission denied' or the error's own line."""
    text = f"{err} {err.__cause__ or ''}".lower()
    if any(s in text for s in _NO_SPACE):
        return "disk full (No space left on device)"
    if any(s in text for s in _NO_PERMISSION):
        return f"permission denied ({one_line(err, 160)})"
    return one_line(err)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def state_bytes(state: Any) -> int:
    """Bytes of every array in `state` (global sizes): about one checkpoint on disk."""
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state)))


def free_bytes(directory: str) -> int | None:
    """Free bytes on the filesystem of a local `directory` (None for object stores)."""
    if paths.is_remote(directory):
        return None
    path = directory
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def set_aside(directory: str, step: int) -> str:
    """Renames `directory/<step>` to `<step>.corrupt-<time>` (Orbax skips it); returns the new path."""
    source = paths.join(directory, str(step))
    target = f"{source}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        if paths.is_remote(source):
            paths._epath(source).rename(target)  # pylint: disable=protected-access
        else:
            os.rename(source, target)
    _sync("kto_jax_checkpoint_set_aside")
    return target


def remove_temporary(directory: str, step: int) -> list[str]:
    """Deletes what a failed save of `step` left (`<step>.orbax-checkpoint-tmp*`); returns the paths."""
    if paths.is_remote(directory) or jax.process_index() != 0 or not os.path.isdir(directory):
        return []
    removed = []
    for name in os.listdir(directory):
        if name.startswith(f"{step}{TMP_SUFFIX}"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            removed.append(os.path.join(directory, name))
    return removed


def probe_writable(directory: str) -> None:
    """Raises OSError when `directory` does not take a new entry (permission, read-only).

    Orbax 0.12.8 deadlocks when it cannot create a step's temporary directory (its
    threads wait forever for one another), so a save checks first.
    """
    if paths.is_remote(directory) or jax.process_index() != 0:
        return
    probe = os.path.join(directory, f".write-probe-{os.getpid()}")
    os.mkdir(probe)
    os.rmdir(probe)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices(name)


def log_line(text: str) -> None:
    """A message on stderr from process 0 (the runtime's own logger is not up yet at restore)."""
    if jax.process_index() == 0:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _raised_in_orbax(error: BaseException | None) -> bool:
    """Does `error` (or an exception it was raised from) have a frame in Orbax's code?"""
    seen = 0
    while error is not None and seen < 8:
        tb = error.__traceback__
        while tb is not None:
            if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


# Orbax's note on every read-only CheckpointManager (export, sample, eval): the Checkpointer
# asked for read-only itself. Shown with `kto-jax --verbose` (kto_jax/console.py).
ORBAX_READ_ONLY_NOTE = "Given directory is read only=%s"


class _QuietOrbaxErrors(logging.Filter):
    """Drops Orbax's ERROR records (a traceback per background thread) and asyncio's 'Task
    exception was never retrieved' records of Orbax's read tasks: the Checkpointer reports
    each failure itself, once, as a UserError. Drops Orbax's read-only note unless verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == ORBAX_READ_ONLY_NOTE and f"{os.sep}orbax{os.sep}" in record.pathname:
            return console.is_verbose()
        if record.levelno < logging.ERROR:
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (f"{os.sep}orbax{os.sep}" in record.pathname or _raised_in_orbax(error))


_FILTER = _QuietOrbaxErrors()


def _orbax_noise(unraisable) -> bool:
    """Tracebacks Python prints for exceptions nobody can catch, all noise once the
    Checkpointer has reported the failure: TensorStore completing a write future of a failed
    save after Orbax closed its event loop ('Event loop is closed', one per array), and
    Orbax's read coroutines of an unreadable checkpoint that are garbage-collected with
    their exception (one 'Exception ignored in: <coroutine ...>' per array)."""
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)
    return ((code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename)
            or _raised_in_orbax(value))


def _quiet_unraisable(unraisable) -> None:
    if not _orbax_noise(unraisable):
        _quiet_unraisable.previous(unraisable)


def quiet_orbax_errors() -> None:
    """Installs the filter on absl's logger and the unraisable-exception hook (idempotent)."""
    for name in ("absl", "", "asyncio"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    if sys.unraisablehook is not _quiet_unraisable:
        _quiet_unraisable.previous = sys.unraisablehook
        sys.unraisablehook = _quiet_unraisable
