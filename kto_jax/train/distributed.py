"""Multi-process start-up and preemption (SIGTERM) handling.

`initialize` calls `jax.distributed.initialize()` when the run spans processes:
  - a coordinator is given (arguments, or the KTO_JAX_COORDINATOR_ADDRESS,
    KTO_JAX_NUM_PROCESSES, KTO_JAX_PROCESS_ID environment variables that the
    launch scripts set, e.g. from SLURM): explicit initialisation;
  - this host has TPU chips (a Cloud TPU VM, single host or pod slice): the
    argument-free form, which discovers the slice's workers itself.
It must run before anything touches a JAX device. Set KTO_JAX_DISTRIBUTED=off to
skip it. CPU processes exchange collectives through gloo.

`PreemptionGuard` turns SIGTERM (how Cloud TPU and SLURM announce preemption)
into a flag the training loop polls between steps; with several processes the
flag is OR-reduced so every process stops after the same step, saves the same
checkpoint together, and exits 0.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np

from kto_jax.console import has_tpu_chips
from kto_jax.errors import UserError

ENV_COORDINATOR = "KTO_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "KTO_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "KTO_JAX_PROCESS_ID"
ENV_SWITCH = "KTO_JAX_DISTRIBUTED"


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer.") from None


def resolve_coordinator(coordinator_address: str | None = None, num_processes: int | None = None,
                        process_id: int | None = None) -> tuple[str, int, int] | None:
    """(address, num_processes, process_id) from arguments, else environment, else None."""
    address = coordinator_address or os.environ.get(ENV_COORDINATOR, "").strip() or None
    count = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
    rank = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
    if address is None and count is None and rank is None:
        return None
    missing = [name for name, v in ((ENV_COORDINATOR, address), (ENV_NUM_PROCESSES, count),
                                    (ENV_PROCESS_ID, rank)) if v is None]
    if missing:
        raise UserError("a multi-process run needs the coordinator address, the number of "
                        f"processes and this process's id; missing: {', '.join(missing)}.")
    if not 0 <= rank < count:
        raise UserError(f"{ENV_PROCESS_ID}={rank} must lie in [0, {ENV_NUM_PROCESSES}={count}).")
    return address, count, rank


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts JAX's multi-process runtime when the run needs it; returns whether it did."""
    if os.environ.get(ENV_SWITCH, "").lower() in ("off", "0", "false"):
        return False
    if jax.distributed.is_initialized():
        return True
    explicit = resolve_coordinator(coordinator_address, num_processes, process_id)
    if explicit is None and not has_tpu_chips():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit is None:
        jax.distributed.initialize()
    else:
        address, count, rank = explicit
        jax.distributed.initialize(coordinator_address=address, num_processes=count,
                                   process_id=rank)
    return True


def any_process(flag: bool) -> bool:
    """OR of a host-side flag over all processes (itself when there is one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
    return bool(np.asarray(gathered).any())


def agree(flag: bool) -> bool:
    """Process 0's value of a host-side flag, on every process (so all take the same branch)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(int(flag), np.int32)))


class PreemptionGuard:
    """Records SIGTERM instead of dying, so the loop can checkpoint and exit 0.

    Use as a context manager around the training loop; the previous handler comes
    back on exit. Signal handlers can only be set from the main thread; elsewhere
    (e.g. a test calling the trainer from a worker thread) the guard is inert.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._signals = signals
        self._previous: dict[int, object] = {}
        self._event = threading.Event()

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self._event.set()

    @property
    def requested(self) -> bool:
        """Whether this process received the signal."""
        return self._event.is_set()

    def should_stop(self) -> bool:
        """Whether any process received the signal (a collective with several processes)."""
        return any_process(self._event.is_set())
