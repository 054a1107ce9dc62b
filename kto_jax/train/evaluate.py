"""Evaluation on the held-out split: the loss and its reward statistics, no update.

Every `train.eval_every` steps (and after the last step) the eval batches go
through the jitted eval step; its additive metrics are summed over all batches on
device and summarised once, so the numbers are those of the whole split, not a
mean of batch means. The line goes to WORKDIR/eval_metrics.jsonl and TensorBoard
(eval/...): loss, rewards/desirable, rewards/undesirable, rewards/margins, kl,
logps, and rewards/accuracies where the loss defines it (paired losses).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterable

import jax

from kto_jax.losses.common import add_metrics, summarize_metrics
from kto_jax.train import batches as batches_lib
from kto_jax.train import metric_names

if TYPE_CHECKING:
    from kto_jax.train.run import Run

_add = jax.jit(add_metrics)


def evaluation_due(run: "Run", step: int) -> bool:
    every = run.settings.train.eval_every
    if every <= 0 or run.data is None or run.data.eval_batches is None:
        return False
    return step % every == 0 or step == run.num_steps


def evaluate(run: "Run", eval_batches: Callable[[], Iterable[dict]] | None = None
             ) -> dict[str, float]:
    """Summarised metrics of the eval step over the whole held-out split (`eval_batches`:
    another split's, e.g. an online round's held-out examples; default the run's)."""
    sums = None
    for local in (eval_batches or run.data.eval_batches)():
        metrics = run.eval_step(run.state, batches_lib.to_global(local, run.batch_sharding))
        sums = metrics if sums is None else _add(sums, metrics)
    if sums is None:
        return {}
    return summarize_metrics(jax.device_get(sums),
                             metric_names.averaging(run.settings.train.metric_names))


def maybe_evaluate(run: "Run", step: int) -> float:
    """Evaluates and logs when due; returns the seconds it took (0 when not due)."""
    if not evaluation_due(run, step):
        return 0.0
    start = time.perf_counter()
    run.logger.log_eval(step, evaluate(run))
    return time.perf_counter() - start
