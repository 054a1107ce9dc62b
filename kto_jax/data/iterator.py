"""The grain pipeline over global batch indices, and its checkpointable iterator.

  MapDataset.range(start, stop)      global batch indices (epoch-major)
    .map(PlanBatch)                  global shuffle + length grouping + shape, per epoch
                                     (`EpochPlans`: planned once, shared with the summary)
    .map(ShardRows)                  this process's rows of every microbatch
    .map(TokenizeRows)               their tokens: cached from start-up, else tokenized now
    .map(PadRows)                    static-shape numpy arrays (kto_jax/batch.py), padded
                                     or packed (data.packing)
    .to_iter_dataset(ReadOptions)    thread prefetch of `data.prefetch` batches
    .mp_prefetch(...)                `data.worker_count` worker processes (if > 0)

`FeedbackIterator` counts the batches it has handed out; its state is
{"next_batch": k, "fingerprint": ...}. `set_state` rebuilds the pipeline from
index k, so a restore continues at exactly the next batch whatever the worker
count, and refuses a state recorded on different data or batching settings.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from kto_jax.data import batching
from kto_jax.data.shards import ShardedSplit
from kto_jax.errors import UserError

TRAIN_STREAM, EVAL_STREAM = 3, 5   # random streams of one seed: train and eval plans differ
_FOREVER = 2 ** 62
_PLAN_CACHE = 2


class EpochPlans:
    """`plan_epoch` of one split, layout, seed and stream, by epoch (the last two kept).

    One is shared by the summary (epoch 0) and every iterator over the split, so each
    epoch is planned once per process, not once per consumer. The planner's inputs
    are the split's lengths (no copy for unpaired data); a plan holds 4 bytes per example.
    """

    def __init__(self, split: ShardedSplit, layout: batching.BatchLayout, seed: int,
                 stream: int):
        self.prompt_lengths = split.prompt_lengths
        self.completion_lengths = split.completion_lengths
        self.layout, self.seed, self.stream = layout, seed, stream
        self.per_epoch = batching.batches_per_epoch(len(split), layout)
        self._plans: dict[int, batching.EpochPlan] = {}

    def __call__(self, epoch: int) -> batching.EpochPlan:
        plan = self._plans.get(epoch)
        if plan is None:
            plan = batching.plan_epoch(self.prompt_lengths, self.completion_lengths, self.layout,
                                       seed=self.seed, epoch=epoch, stream=self.stream)
            while len(self._plans) >= _PLAN_CACHE:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = plan
        return plan


class PlanBatch:
    """Global batch index -> `PlannedBatch`, from the shared per-epoch plans."""

    def __init__(self, plans: EpochPlans):
        self.plans = plans

    def __call__(self, index: int) -> batching.PlannedBatch:
        epoch, position = divmod(int(index), self.plans.per_epoch)
        return self.plans(epoch)[position]


class ShardRows:
    """`PlannedBatch` -> (planned, example ids [A, M_local], valid [A, M_local])."""

    def __init__(self, layout: batching.BatchLayout):
        self.layout = layout

    def __call__(self, planned: batching.PlannedBatch):
        rows, valid = batching.local_rows(planned, self.layout)
        return planned, rows, valid


class TokenizeRows:
    """(planned, rows, valid) -> (planned, rows, valid, tokens of those rows).

    Phase 2 of kto_jax/data/shards.py: only this process's rows are tokenized, and
    those of its start-up slice come from the cache.
    """

    def __init__(self, split: ShardedSplit, layout: batching.BatchLayout):
        self.split, self.layout = split, layout

    def __call__(self, item):
        planned, rows, valid = item
        needed = rows
        if self.layout.pack_length and self.layout.pack_second and not self.split.paired:  # and their KL neighbours
            needed = np.concatenate([rows, batching.kl_rows(planned, self.layout)], axis=1)
        return planned, rows, valid, self.split.row_tokens(needed)


class PadRows:
    """(planned, rows, valid, tokens) -> the batch dict of numpy arrays: padded, or packed
    (`batching.pack_rows`) when the layout has a pack_length."""

    def __init__(self, split: ShardedSplit, layout: batching.BatchLayout):
        self.lengths, self.layout = split, layout   # the gathered (global) lengths

    def __call__(self, item) -> dict:
        planned, rows, valid, tokens = item
        if self.layout.pack_length:
            return batching.pack_rows(tokens, self.lengths, rows, valid, planned, self.layout)
        return batching.pad_rows(tokens, rows, valid, planned, self.layout.pad_id)


def build_pipeline(split: ShardedSplit, plans: EpochPlans, *, start: int, stop: int,
                   prefetch: int, worker_count: int) -> grain.IterDataset:
    """The grain dataset of batches [start, stop) for this process (`plans.layout`'s rows)."""
    ds = (grain.MapDataset.range(start, stop)
          .map(PlanBatch(plans))
          .map(ShardRows(plans.layout))
          .map(TokenizeRows(split, plans.layout))
          .map(PadRows(split, plans.layout)))
    read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    it = ds.to_iter_dataset(read)
    if worker_count > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=max(prefetch, 1)))
    return it


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; our CLI parses its own FlagValues."""
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class FeedbackIterator(grain.DatasetIterator):
    """Batches of one process, with an exact, worker-count independent state."""

    def __init__(self, split: ShardedSplit, plans: EpochPlans, *, num_batches: int,
                 prefetch: int, worker_count: int, fingerprint: str):
        super().__init__()
        self._args = dict(split=split, plans=plans, prefetch=prefetch, worker_count=worker_count)
        self.num_batches = num_batches
        self.fingerprint = fingerprint
        self.batches_per_epoch = plans.per_epoch
        self._next = 0
        self._inner = None

    @property
    def next_batch(self) -> int:
        """Global index of the batch the next `next()` returns."""
        return self._next

    @property
    def pack_groups(self) -> int:
        """Packing groups of this process's share of a packed batch (1 when not packed)."""
        layout = self._args["plans"].layout
        return layout.pack_groups // layout.process_count if layout.pack_length else 1

    @property
    def epoch(self) -> int:
        return self._next // self.batches_per_epoch

    def __next__(self) -> dict:
        if self._next >= self.num_batches:
            raise StopIteration
        if self._inner is None:
            self.start_prefetch()
        batch = next(self._inner)
        self._next += 1
        return batch

    def start_prefetch(self) -> None:
        if self._inner is None:
            self._inner = iter(build_pipeline(start=self._next, stop=self.num_batches,
                                              **self._args))
        if hasattr(self._inner, "start_prefetch"):
            self._inner.start_prefetch()

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": self._next, "fingerprint": self.fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"the saved data-iterator state was recorded on other data or batching "
                f"settings (fingerprint {state.get('fingerprint')!r}, now {self.fingerprint!r}); "
                "resume with the same data files, tokenizer, data.* and train batch sizes, or "
                "start a new workdir.")
        self.close()
        self._closed = False
        self._next = int(state["next_batch"])

    def close(self) -> None:
        if self._inner is not None and hasattr(self._inner, "close"):
            self._inner.close()
        self._inner = None


class TrainFactory:
    """`train_iter_factory(num_epochs=None, *, forever=False)`.

    num_epochs=None means data.num_epochs (`DataSettings`); forever=True repeats without end
    (each epoch reshuffled), for runs that stop at train.num_steps.
    """

    def __init__(self, split: ShardedSplit, plans: EpochPlans, data_config, fingerprint: str):
        self.split, self.plans, self.fingerprint = split, plans, fingerprint
        self.num_epochs = data_config.num_epochs
        self.prefetch, self.worker_count = data_config.prefetch, data_config.worker_count
        self.batches_per_epoch = plans.per_epoch

    def __call__(self, num_epochs: int | None = None, *, forever: bool = False
                 ) -> FeedbackIterator:
        epochs = self.num_epochs if num_epochs is None else num_epochs
        total = _FOREVER if forever else self.batches_per_epoch * int(epochs)
        return FeedbackIterator(self.split, self.plans, num_batches=total, prefetch=self.prefetch,
                                worker_count=self.worker_count, fingerprint=self.fingerprint)


class EvalBatches:
    """`eval_batches()`: one pass over the eval split; the same batches every call."""

    def __init__(self, split: ShardedSplit, plans: EpochPlans, data_config):
        self.split, self.plans = split, plans
        self.prefetch = data_config.prefetch
        self.num_batches = plans.per_epoch

    def __call__(self) -> FeedbackIterator:
        return FeedbackIterator(self.split, self.plans, num_batches=self.num_batches,
                                prefetch=self.prefetch, worker_count=0, fingerprint="eval")
