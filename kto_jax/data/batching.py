"""Global batch plans and static-shape batch assembly (layout: kto_jax/batch.py).

A *plan* fixes, for one epoch, which examples form each global batch and the
padded shape (P, C) of that batch. It depends only on the token lengths (the
same on every process: all-gathered at start-up, kto_jax/data/shards.py), the
seed and the epoch, so every process computes the same plan, and a batch is a
pure function of its global index (exact resume).

Planning one epoch:
  1. a global permutation of the examples (seed, epoch);
  2. optional length grouping: within windows of `bucket_window` global batches,
     examples are stably sorted by their length bucket and cut into batches, and
     the full batches of the window are shuffled again (1 = no grouping);
  3. cut into global batches of G = A*M examples; the last one may be partial;
  4. each batch gets the smallest prompt bucket P >= its longest prompt and the
     smallest completion bucket C >= its longest completion.

Assembling: example k of a full batch goes to microbatch k // M, row k % M. A
partial batch spreads its n examples round-robin over the A microbatches (so each
has about n/A real rows, first in the microbatch) and fills the rest with filler
rows (copies of real rows with valid=False, weight=0). Each process then keeps its
contiguous block of M / process_count rows of every microbatch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kto_jax.batch import as_batch
from kto_jax.data.tokenize import TokenizedSplit


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Shapes and sharding of the batches one process yields.

    Attributes:
      accumulation: A, microbatches per optimizer step.
      micro_batch: M, global rows per microbatch.
      process_index, process_count: this process and how many share each batch.
      prompt_buckets, completion_buckets: ascending padded lengths P and C.
      pad_id: token id written into padding (masks mark it; any id works).
      window: bucket_window, in global batches (1 = no length grouping).
      drop_remainder: drop an epoch's last partial batch instead of padding it.
    """
    accumulation: int
    micro_batch: int
    process_index: int
    process_count: int
    prompt_buckets: tuple[int, ...]
    completion_buckets: tuple[int, ...]
    pad_id: int
    window: int = 1
    drop_remainder: bool = False

    @property
    def global_batch(self) -> int:
        return self.accumulation * self.micro_batch

    @property
    def local_micro_batch(self) -> int:
        return self.micro_batch // self.process_count


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    """One global batch: example indices (<= G, in slot order) and its padded shape."""
    indices: np.ndarray
    prompt_len: int
    completion_len: int


def bucket_sizes(bucket_lengths, max_prompt_length: int, max_completion: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Prompt buckets (capped by max_prompt_length) and completion buckets (by max_completion)."""
    prompt = sorted({int(b) for b in bucket_lengths if 0 < b < max_prompt_length}
                    | {max_prompt_length})
    completion = sorted({int(b) for b in bucket_lengths if 0 < b < max_completion}
                        | {max_completion})
    return tuple(prompt), tuple(completion)


def _bucket_of(lengths: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    return np.searchsorted(np.asarray(buckets), lengths, side="left")


def plan_epoch(prompt_lengths: np.ndarray, completion_lengths: np.ndarray, layout: BatchLayout,
               *, seed: int, epoch: int, stream: int = 3) -> list[PlannedBatch]:
    """The global batches of one epoch (see the module docstring for the rules).

    `stream` separates independent uses of one seed (train and eval plans differ).
    """
    n, g = len(prompt_lengths), layout.global_batch
    order = np.random.default_rng([seed, stream, epoch]).permutation(n)
    p_bucket = _bucket_of(prompt_lengths, layout.prompt_buckets)
    c_bucket = _bucket_of(completion_lengths, layout.completion_buckets)
    key = c_bucket * len(layout.prompt_buckets) + p_bucket
    chunks: list[np.ndarray] = []
    span = max(1, layout.window) * g
    for start in range(0, n, span):
        window = order[start:start + span]
        if layout.window > 1:
            window = window[np.argsort(key[window], kind="stable")]
        cut = [window[k:k + g] for k in range(0, len(window), g)]
        full = [c for c in cut if len(c) == g]
        if layout.window > 1:
            perm = np.random.default_rng([seed, stream + 1, epoch, start]).permutation(len(full))
            full = [full[i] for i in perm]
        chunks.extend(full)
        chunks.extend(c for c in cut if len(c) < g and not layout.drop_remainder)
    return [PlannedBatch(c, layout.prompt_buckets[p_bucket[c].max()],
                         layout.completion_buckets[c_bucket[c].max()]) for c in chunks]


def batches_per_epoch(n: int, layout: BatchLayout) -> int:
    g = layout.global_batch
    return n // g if layout.drop_remainder else -(-n // g)


def slot_sources(n_real: int, layout: BatchLayout) -> tuple[np.ndarray, np.ndarray]:
    """Which planned example fills each global slot, and whether it is real.

    Returns:
      (source, valid): int [A, M] positions into the batch's `indices`, bool [A, M].
    """
    a, m = layout.accumulation, layout.micro_batch
    if n_real == a * m:
        return np.arange(a * m).reshape(a, m), np.ones((a, m), bool)
    valid = np.zeros((a, m), bool)
    source = np.arange(a * m).reshape(a, m) % max(n_real, 1)  # fillers copy real rows
    k = np.arange(n_real)
    source[k % a, k // a] = k
    valid[k % a, k // a] = True
    return source, valid


def local_rows(planned: PlannedBatch, layout: BatchLayout) -> tuple[np.ndarray, np.ndarray]:
    """This process's shard of a global batch: example ids and validity, [A, M_local] each.

    Process p keeps rows [p * M_local, (p + 1) * M_local) of every microbatch, so the
    processes' slices, concatenated along M in process order, are the global batch.
    """
    source, valid = slot_sources(len(planned.indices), layout)
    lo = layout.process_index * layout.local_micro_batch
    hi = lo + layout.local_micro_batch
    return planned.indices[source[:, lo:hi]], valid[:, lo:hi]


def pad_rows(split: TokenizedSplit, rows: np.ndarray, valid: np.ndarray, planned: PlannedBatch,
             pad_id: int) -> dict:
    """Static-shape numpy arrays [A, M_local, ...] for the given example ids.

    `split` is a `TokenizedSplit`, or the `shards.RowTokens` of these rows (its
    prompts/completions are dicts id -> ids; label and weight global arrays).
    Prompts are left-padded to P, completions right-padded to C; keys and dtypes are
    those of kto_jax/batch.py (`as_batch`: unpaired, or paired when the split holds pairs).
    Filler rows (valid=False) carry weight 0.
    """
    batch = {}
    batch["prompt_ids"], batch["prompt_mask"] = _pad(split.prompts, rows, planned.prompt_len,
                                                     pad_id, left=True)
    names = ("chosen", "rejected") if split.paired else ("completion",)
    for name, ragged in zip(names, split.completions):
        batch[f"{name}_ids"], batch[f"{name}_mask"] = _pad(ragged, rows, planned.completion_len,
                                                           pad_id, left=False)
    if not split.paired:
        batch["desirable"] = split.label[rows]
        batch["weight"] = np.where(valid, split.weight[rows], 0.0).astype(np.float32)
    batch["valid"] = valid.copy()
    return as_batch(batch, split.paired)


def assemble(split: TokenizedSplit, planned: PlannedBatch, layout: BatchLayout) -> dict:
    """`local_rows` then `pad_rows`: this process's arrays of one planned global batch."""
    rows, valid = local_rows(planned, layout)
    return pad_rows(split, rows, valid, planned, layout.pad_id)


def _pad(ragged, rows: np.ndarray, length: int, pad_id: int, *, left: bool
         ) -> tuple[np.ndarray, np.ndarray]:
    """ids, mask int32 [*rows.shape, length]; left padding keeps the prompt end adjacent."""
    ids = np.full(rows.shape + (length,), pad_id, np.int32)
    mask = np.zeros(rows.shape + (length,), np.int32)
    for pos in np.ndindex(rows.shape):
        tokens = ragged[int(rows[pos])]
        k = len(tokens)
        if left:
            ids[pos + (slice(length - k, length),)] = tokens
            mask[pos + (slice(length - k, length),)] = 1
        else:
            ids[pos + (slice(0, k),)] = tokens
            mask[pos + (slice(0, k),)] = 1
    return ids, mask


def plan_stats(split, plan: list[PlannedBatch], layout: BatchLayout) -> dict:
    """Padding efficiency and shape counts of a plan, over the whole global batches.

    `split`: a `TokenizedSplit` or `shards.ShardedSplit` (lengths and labels only).

    efficiency = real tokens / padded tokens, where a batch's padded tokens are
    G * (P + C) (G * (P + 2C) for pairs) and filler rows count as padding.
    """
    sides = len(split.side_lengths)
    lengths = split.total_lengths
    real = padded = 0
    shapes: dict[tuple[int, int], int] = {}
    single_class = 0
    for b in plan:
        real += int(lengths[b.indices].sum())
        padded += layout.global_batch * (b.prompt_len + sides * b.completion_len)
        shape = (b.prompt_len, b.completion_len)
        shapes[shape] = shapes.get(shape, 0) + 1
        labels = split.label[b.indices]
        single_class += int(not split.paired and (labels.all() or not labels.any()))
    return {"efficiency": real / padded if padded else 0.0, "shapes": shapes,
            "single_class_batches": single_class, "batches": len(plan),
            "filler_rows": sum(layout.global_batch - len(b.indices) for b in plan),
            "remainder_dropped": len(split) - sum(len(b.indices) for b in plan)}
