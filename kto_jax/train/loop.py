"""The step loop: batches in, train steps, metrics windows out, checkpoints, preemption.

Each logged line summarises the window of steps since the previous line: the
loss's additive metrics summed over the window (`kto_jax.losses.summarize_metrics`
turns sums into means), the mean gradient norm, and the learning rate and skip
count of the window's last step. The window is summed on device (no host sync
between log lines) and saved with every checkpoint, so a resumed run writes
the same lines as an uninterrupted one. Throughput (tokens/s, MFU) is wall-clock
and naturally differs between runs; metrics.TIMING_KEYS lists those keys.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kto_jax.batch import KL_ROW_KEYS, has_kl_stream, is_packed
from kto_jax.losses.common import summarize_metrics
from kto_jax.step import flops as flops_lib
from kto_jax.train import batches as batches_lib
from kto_jax.train import metric_names
from kto_jax.train.distributed import PreemptionGuard
from kto_jax.train.evaluate import maybe_evaluate
from kto_jax.train.metrics import REQUIRED_KEYS
from kto_jax.train.run import Run, saved_state

LAST_VALUE_KEYS = ("lr", "skipped_updates")  # per-step values: the window reports its last
WINDOW_STEPS = "window_steps"


@jax.jit
def _accumulate(window: dict, metrics: dict) -> dict:
    out = {k: (metrics[k] if k in LAST_VALUE_KEYS else window[k] + metrics[k]) for k in metrics}
    out[WINDOW_STEPS] = window[WINDOW_STEPS] + 1
    return out


class MetricsWindow:
    """Device-side sums of the step metrics since the last log line."""

    def __init__(self, saved: Mapping[str, Any] | None = None):
        self._sums = None
        if saved:
            self._sums = {k: jnp.asarray(np.asarray(v, saved["dtypes"][k]))
                          for k, v in saved["values"].items()}

    def add(self, metrics: Mapping[str, jax.Array]) -> None:
        if self._sums is None:
            zeros = {k: jnp.zeros_like(v) for k, v in metrics.items()}
            self._sums = dict(zeros, **{WINDOW_STEPS: jnp.zeros((), jnp.int32)})
        self._sums = _accumulate(self._sums, dict(metrics))

    def to_host(self) -> dict[str, Any] | None:
        """The sums as Python numbers plus their dtypes (exact: float32 -> float -> float32)."""
        if self._sums is None:
            return None
        host = jax.device_get(self._sums)
        return {"values": {k: np.asarray(v).item() for k, v in host.items()},
                "dtypes": {k: np.asarray(v).dtype.name for k, v in host.items()}}

    def pop_summary(self, averaging: str = "pooled") -> dict[str, Any]:
        """Readable metrics of the window (`summarize_metrics`' `averaging`); the window starts afresh."""
        sums = (self.to_host() or {"values": {WINDOW_STEPS: 0}})["values"]
        self._sums = None
        steps = max(int(sums.pop(WINDOW_STEPS)), 1)
        last = {k: sums.pop(k) for k in LAST_VALUE_KEYS if k in sums}
        grad_norm = sums.pop("grad_norm", float("nan")) / steps
        out = summarize_metrics(sums, averaging)
        out.update(last, grad_norm=grad_norm)
        for key in REQUIRED_KEYS:
            out.setdefault(key, None)  # e.g. no "kl" for DPO: null rather than a made-up number
        return out


class Throughput:
    """Padded tokens and model FLOPs per second between log lines (process-local clock)."""

    def __init__(self, run: Run):
        self._run, self._loss = run, run.settings.loss
        self._num_devices = jax.device_count()
        self.reset()

    def reset(self) -> None:
        self._start, self._tokens, self._flops, self._real = time.perf_counter(), 0, 0.0, 0.0

    def add(self, batch: Mapping[str, jax.Array]) -> None:
        self._tokens += batches_lib.padded_tokens(batch)
        self._flops += flops_lib.step_flops(
            self._run.flop_dims, loss=self._loss, reference_source=self._run.config.reference.source,
            global_batch=batches_lib.global_sequences(batch),
            seq_len=batches_lib.sequence_length(batch), packed=is_packed(batch),
            kl_len=int(batch[KL_ROW_KEYS[0]].shape[-1]) if has_kl_stream(batch) else 0)

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` (an evaluation) out of the current window's time."""
        self._start += seconds

    def pop(self, real_tokens: float) -> dict[str, float]:
        seconds = max(time.perf_counter() - self._start, 1e-9)
        out = {"tokens_per_s": self._tokens / seconds, "nonpad_tokens_per_s": real_tokens / seconds,
               "mfu": flops_lib.mfu(self._flops, seconds, self._num_devices, self._run.peak_flops)}
        self.reset()
        return out


def save_checkpoint(run: Run, step: int, window: MetricsWindow, *, force: bool = False) -> bool:
    """Saves `step` if due (or forced), with the data position and the metrics window.

    Every call first checks that no earlier (async) save has failed, so a failed save
    stops training at the next step (CheckpointSaveError), not at the next save.
    """
    run.checkpointer.raise_if_save_failed()
    if not force and step % run.checkpointer.every_steps:
        return False
    synced = run.settings.step.reference_sync is not None
    return run.checkpointer.save(step, saved_state(run.state, synced), run.train_iter,
                                 run.config_json, meta={"window": window.to_host()}, force=force)


@dataclasses.dataclass(frozen=True)
class Segment:
    """The steps one `run_loop` trains: from `start` to `stop`, logged every train.log_every
    steps counted from `origin` (and at `stop`), each logged row carrying `tags`.

    `checkpoints`: the loop saves every checkpoint.every_steps and on SIGTERM (a whole
    run); False leaves saving to the caller (an online round saves after its evaluation).
    """
    start: int
    stop: int
    origin: int = 0
    tags: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checkpoints: bool = True


def _log(run: Run, step: int, window: MetricsWindow, throughput: Throughput,
         tags: Mapping[str, Any]) -> dict:
    record = window.pop_summary(metric_names.averaging(run.settings.train.metric_names))
    record.update(throughput.pop(record.get("tokens") or 0.0))
    record.update(tags)
    run.logger.log_train(step, record)
    return record


def _warn_once(run: Run, record: Mapping[str, Any]) -> None:
    """The loss's warning about a logged window (`HaloLoss.window_warnings`), once per run."""
    warning = None if run.warned else run.settings.loss.window_warning(record)
    if warning:
        run.logger.message(warning)
        run.warned = True


def run_loop(run: Run, guard: PreemptionGuard, segment: Segment | None = None) -> str:
    """Trains `segment` (default: run.start_step to run.num_steps) on run.train_iter;
    returns "done" or "preempted"."""
    seg = segment or Segment(run.start_step, run.num_steps)
    every = run.settings.train.log_every
    window, throughput = MetricsWindow(run.window), Throughput(run)
    step = seg.start
    while step < seg.stop:
        if guard.should_stop():
            if seg.checkpoints:
                save_checkpoint(run, step, window, force=True)
            return "preempted"
        batch = batches_lib.to_global(next(run.train_iter), run.batch_sharding)
        run.state, metrics = run.train_step(run.state, batch)
        step += 1
        window.add(metrics)
        throughput.add(batch)
        if (step - seg.origin) % every == 0 or step == seg.stop:
            _warn_once(run, _log(run, step, window, throughput, seg.tags))
        throughput.exclude(maybe_evaluate(run, step))
        if seg.checkpoints:
            save_checkpoint(run, step, window)
        run.logger.advance()
    return "done"
