"""One run per workdir: WORKDIR/run.lock names the host, PID and start time of the run using it.

Two `kto-jax train` processes on one workdir would interleave checkpoints, metrics
and the export. The lock file is created atomically (O_EXCL); a second run finds it
and stops with a message naming the holder. A lock left by a run that died (its PID
no longer alive on this host: SIGKILL, OOM, a crash) is taken over with a warning.
A lock from another host cannot be checked from here, so it is an error that says
how to remove it. Only process 0 of a multi-process run locks; object-store workdirs
(gs://) have no atomic create and are not locked.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable

from kto_jax.errors import UserError
from kto_jax import fs as paths
from kto_jax.train import workdir as layout



def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"PID {holder.get('pid')} on host {holder.get('host')!r}, started "
            f"{holder.get('started', '?')}")


class WorkdirLock:
    """`with WorkdirLock(workdir, log):` holds WORKDIR/run.lock for the duration of a run."""

    def __init__(self, workdir: str, log: Callable[[str], None] = print, enabled: bool = True):
        self.path = layout.path(paths.resolve(workdir), layout.LOCK_FILE)
        self._log = log
        self._enabled = enabled and not paths.is_remote(workdir)
        self._held = False

    def acquire(self) -> None:
        """Creates the lock file, or raises UserError when a live run holds it."""
        if not self._enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        for _ in range(3):  # a stale lock removed by us (or by a concurrent run) is retried
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing(me)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
                f.write("\n")
            self._held = True
            return
        raise UserError(f"cannot take the workdir lock {self.path}: another run keeps creating it.")

    def _handle_existing(self, me: dict) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
        except FileNotFoundError:
            return  # released meanwhile: retry
        except (OSError, ValueError):
            holder = {}
        same_host = holder.get("host") == me["host"]
        pid = holder.get("pid")
        if same_host and isinstance(pid, int) and pid != me["pid"] and _pid_alive(pid):
            raise UserError(f"workdir {os.path.dirname(self.path)} is in use by another run "
                            f"({_describe(holder)}; lock file {self.path}). Wait for it to "
                            "finish, stop it, or pass another --workdir.")
        if not same_host and holder:
            raise UserError(f"workdir {os.path.dirname(self.path)} is locked by a run on another "
                            f"host ({_describe(holder)}; lock file {self.path}). If that run is "
                            f"gone, delete {self.path} and re-run.")
        self._log(f"warning: taking over the stale workdir lock {self.path} "
                  f"({_describe(holder) if holder else 'unreadable'}: no such process any more).")
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
