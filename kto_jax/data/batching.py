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
     the examples of a full batch are spread over its A microbatches so each holds
     about the same number of tokens (`balance_microbatches`: the packed layout gives
     every microbatch of a batch the same row count, so uneven microbatches leave rows
     empty; the padded layout is indifferent, and both use the same microbatches);
  4. each batch gets the smallest prompt bucket P >= its longest prompt and the
     smallest completion bucket C >= its longest completion.

Assembling: example k of a full batch goes to microbatch k // M, row k % M. A
partial batch spreads its n examples round-robin over the A microbatches (so each
has about n/A real rows, first in the microbatch) and fills the rest with filler
rows (copies of real rows with valid=False, weight=0). Each process then keeps its
contiguous block of M / process_count rows of every microbatch.

Packing (data.packing; kto_jax/data/packing.py): the same plan, so the same examples
share a microbatch in the same order; instead of padding them, `pack_rows` packs
each microbatch's examples [x | y | y_kl] (y_kl = y_{i+1 mod M} of the GLOBAL
microbatch) or [x | y_w | y_l] into rows of `pack_length` tokens, one group of rows
per batch shard. The row count R of a batch is the most any of its microbatches
needs, computed from the gathered lengths, so every process agrees on it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kto_jax.batch import as_batch, kl_partners
from kto_jax.data import packing
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
    # packing (off when pack_length is 0); repr=False keeps padded runs' fingerprints as they were
    pack_length: int = dataclasses.field(default=0, repr=False)
    pack_groups: int = dataclasses.field(default=1, repr=False)   # packing groups, all processes
    pack_second: bool = dataclasses.field(default=True, repr=False)  # y_kl / y_l in the trees
    # > 0: an unpaired loss with z0 packs y_kl in kl rows of kl_share * T tokens beside the
    # main rows [x | y] (packing.pack_streams; chosen from the data, kto_jax/data/shapes.py)
    kl_share: float = dataclasses.field(default=0.0, repr=False)
    # allowed packed shapes (T, R) of a microbatch, cheapest first (kto_jax/data/shapes.py);
    # (): rows of pack_length, as many as the batch needs
    pack_shapes: tuple[tuple[int, int], ...] = dataclasses.field(default=(), repr=False)

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


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """The global batches of one epoch, as flat arrays (no Python object per batch).

    The batches are stored as *chunks* in cut order: chunk c holds the example ids
    `indices[c*G:(c+1)*G]` (slot order; only the last chunk may be shorter) and is
    padded to `prompt_len[c]` x `completion_len[c]`. Batch b of the epoch is chunk b,
    except with length grouping (window W > 1), where the full chunks of each window
    are served in a seeded order that `chunk` computes when asked (one permutation of
    W per batch), so planning runs no Python loop over windows or batches.

    `plan[b]` gives the `PlannedBatch`; iterating gives them in epoch order.
    """
    indices: np.ndarray           # int32 [examples planned]
    prompt_len: np.ndarray        # int32 [chunks]
    completion_len: np.ndarray    # int32 [chunks]
    global_batch: int
    window: int = 1
    order_key: tuple[int, ...] = ()    # (seed, stream + 1, epoch): the window shuffles' seed
    # balancing (`balance_microbatches`): M, and each example's tokens as the step lays it
    # out (x + y, + y2); micro_batch 0 or no tokens: example k goes to microbatch k // M
    micro_batch: int = 0
    tokens: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.prompt_len)

    def __getitem__(self, b: int) -> PlannedBatch:
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} of an epoch of {len(self)}")
        c, g = self.chunk(b), self.global_batch
        indices = self.indices[c * g:(c + 1) * g]
        if self.tokens is not None and self.micro_batch and len(indices) == g:
            indices = balance_microbatches(indices, self.tokens[indices], self.micro_batch)
        return PlannedBatch(indices, int(self.prompt_len[c]), int(self.completion_len[c]))

    def __iter__(self):
        return (self[b] for b in range(len(self)))

    @property
    def full_chunks(self) -> int:
        return len(self.indices) // self.global_batch

    def chunk(self, b: int) -> int:
        """The stored chunk that is batch b of the epoch."""
        w, full = self.window, self.full_chunks
        if w == 1 or b >= full:              # no grouping, or the last partial batch
            return b
        first = b - b % w                    # this window's first chunk
        start = first * self.global_batch    # its first example position (the seed's key)
        perm = np.random.default_rng([*self.order_key, start]).permutation(min(w, full - first))
        return first + int(perm[b - first])

    def chunk_reduce(self, values: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
        """`ufunc.reduce` of a per-slot array (aligned with `indices`) over each chunk."""
        return _chunk_reduce(values, self.global_batch, ufunc)


def balance_microbatches(indices: np.ndarray, tokens: np.ndarray, micro_batch: int
                         ) -> np.ndarray:
    """The G example ids of a full global batch reordered so its G / M microbatches hold
    about the same number of tokens (then packed rows of one R fit every microbatch);
    `tokens` [G]: each id's tokens as the step lays it out (x + y, + y2), aligned with
    `indices`.

    Longest example first (ties in plan order), each into the microbatch with the fewest
    tokens so far among those with room for it (ties: the first); within a microbatch
    the examples keep their plan order. Deterministic: every process computes the same.
    """
    g = len(indices)
    a = g // micro_batch
    if a <= 1:
        return indices
    tokens = np.asarray(tokens, np.int64)
    totals, counts = np.zeros(a, np.int64), np.zeros(a, np.int64)
    full = np.iinfo(np.int64).max
    where = np.empty(g, np.int64)
    for i in np.argsort(-tokens, kind="stable"):
        k = int(np.argmin(np.where(counts < micro_batch, totals, full)))
        where[i] = k
        totals[k] += tokens[i]
        counts[k] += 1
    return indices[np.lexsort((np.arange(g), where))]


def _chunk_reduce(values: np.ndarray, g: int, ufunc: np.ufunc) -> np.ndarray:
    """[chunks]: `ufunc.reduce` over consecutive chunks of g values (the last may be shorter)."""
    full = len(values) - len(values) % g
    out = ufunc.reduce(values[:full].reshape(-1, g), axis=1)
    if len(values) > full:
        out = np.append(out, ufunc.reduce(values[full:]))
    return out


def bucket_sizes(bucket_lengths, max_prompt_length: int, max_completion: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Prompt buckets (capped by max_prompt_length) and completion buckets (by max_completion)."""
    prompt = sorted({int(b) for b in bucket_lengths if 0 < b < max_prompt_length}
                    | {max_prompt_length})
    completion = sorted({int(b) for b in bucket_lengths if 0 < b < max_completion}
                        | {max_completion})
    return tuple(prompt), tuple(completion)


def bucket_index(lengths: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    """uint8 [N]: the smallest bucket >= each length, by a lookup table (no int64 [N] temporaries)."""
    lengths = np.asarray(lengths)
    top = int(lengths.max()) if len(lengths) else 0
    table = np.searchsorted(np.asarray(buckets), np.arange(top + 1), side="left")
    return table.astype(np.uint8 if len(buckets) < 256 else np.int32)[lengths]


def _index_dtype(n: int):
    return np.int32 if n < 2 ** 31 else np.int64


def plan_epoch(prompt_lengths: np.ndarray, completion_lengths: np.ndarray, layout: BatchLayout,
               *, seed: int, epoch: int, stream: int = 3) -> EpochPlan:
    """The global batches of one epoch (see the module docstring for the rules).

    `stream` separates independent uses of one seed (train and eval plans differ).
    Vectorised: numpy over examples, no Python loop over batches or windows (the
    window shuffles are drawn per batch when it is asked for, `EpochPlan.chunk`).
    """
    n, g, w = len(prompt_lengths), layout.global_batch, max(1, layout.window)
    # Generator.permutation(n) is arange(n) shuffled in place; shuffling an int32 arange
    # draws the same permutation without permutation's int64 array (8 bytes a row).
    order = np.arange(n, dtype=_index_dtype(n))
    np.random.default_rng([seed, stream, epoch]).shuffle(order)
    p_bucket = bucket_index(prompt_lengths, layout.prompt_buckets)
    c_bucket = bucket_index(completion_lengths, layout.completion_buckets)
    if w > 1:   # stable sort by length bucket within each window of W global batches
        key = (c_bucket[order].astype(np.int64) * len(layout.prompt_buckets) + p_bucket[order]
               + np.arange(n, dtype=np.int64) // (w * g) * (len(layout.prompt_buckets)
                                                           * len(layout.completion_buckets)))
        order = order[np.argsort(key, kind="stable")]
        del key
    if layout.drop_remainder:
        order = order[:n - n % g]
    prompt_len = np.asarray(layout.prompt_buckets, np.int32)[
        _chunk_reduce(p_bucket[order], g, np.maximum)]
    completion_len = np.asarray(layout.completion_buckets, np.int32)[
        _chunk_reduce(c_bucket[order], g, np.maximum)]
    tokens = None
    if layout.accumulation > 1:   # microbatches of even tokens (`balance_microbatches`)
        tokens = (np.asarray(prompt_lengths, np.int32)
                  + np.asarray(completion_lengths, np.int32) * (2 if layout.pack_second else 1))
    return EpochPlan(order, prompt_len, completion_len, g, w, (seed, stream + 1, epoch),
                     layout.micro_batch, tokens)


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


def global_slots(planned: PlannedBatch, layout: BatchLayout) -> np.ndarray:
    """int [A, M]: the example id in every slot of the global batch (fillers included)."""
    return planned.indices[slot_sources(len(planned.indices), layout)[0]]


def kl_slots(planned: PlannedBatch, layout: BatchLayout) -> np.ndarray:
    """int [A, M]: for every slot of the GLOBAL batch, the slot whose completion is its KL
    completion: the next real slot of its microbatch, cyclically (`kto_jax.batch.kl_partners`,
    the step's rule; i + 1 mod M when the microbatch has no filler)."""
    return kl_partners(slot_sources(len(planned.indices), layout)[1])


def kl_rows(planned: PlannedBatch, layout: BatchLayout) -> np.ndarray:
    """int [A, M_local]: for each of this process's slots, the example whose completion is its
    KL completion (`kl_slots`) in the GLOBAL microbatch."""
    lo = layout.process_index * layout.local_micro_batch
    partners = np.take_along_axis(global_slots(planned, layout), kl_slots(planned, layout), axis=1)
    return partners[:, lo:lo + layout.local_micro_batch]


def tree_lengths(lengths, planned: PlannedBatch, layout: BatchLayout, placed: bool = False
                 ) -> np.ndarray:
    """int [A, M]: tokens of every global slot's packed tree, len(x) + len(y) (+ len(y_kl) or
    len(y_l) when `layout.pack_second`); with the kl stream, the share of a row that the
    rows are packed by (`packing.stream_lengths`), unless `placed` (the tokens placed, main
    and kl rows together). `lengths` holds the split's global prompt_lengths and side_lengths."""
    slots = global_slots(planned, layout)
    sides = lengths.side_lengths
    trees = lengths.prompt_lengths[slots].astype(np.int64) + sides[0][slots]
    if layout.kl_share and not placed:   # main rows [x | y] and kl rows: the larger share
        kl = np.take_along_axis(sides[0][slots], kl_slots(planned, layout), axis=1)
        return packing.stream_lengths(trees, kl, layout.kl_share)
    if layout.pack_second:
        trees += sides[1][slots] if len(sides) > 1 else np.take_along_axis(
            sides[0][slots], kl_slots(planned, layout), axis=1)
    return trees


def batch_shape(trees: np.ndarray, layout: BatchLayout) -> tuple[int, int]:
    """(T, R) of a packed global batch whose trees [A, M] are `trees`: the cheapest of the
    layout's shapes that holds its fullest microbatch (one program per shape), or rows of
    `layout.pack_length`, as many as it needs."""
    longest = int(np.max(trees))
    for t, r in layout.pack_shapes:
        if longest <= t and packing.microbatch_rows(trees, t, layout.pack_groups) <= r:
            return int(t), int(r)
    return layout.pack_length, packing.microbatch_rows(trees, layout.pack_length,
                                                       layout.pack_groups)


def pack_rows(split, lengths, rows: np.ndarray, valid: np.ndarray, planned: PlannedBatch,
              layout: BatchLayout) -> dict:
    """The packed batch (kto_jax/batch.py) of this process's examples of one planned batch.

    Args:
      split: a `TokenizedSplit` or `shards.RowTokens` holding the tokens of `rows` and of
        their KL neighbours (`kl_rows`).
      lengths: the split's gathered lengths (prompt_lengths, side_lengths), global.
      rows, valid: `local_rows` of the batch.
    """
    paired = split.paired
    groups = layout.pack_groups // layout.process_count
    pack_length, num_rows = batch_shape(tree_lengths(lengths, planned, layout), layout)
    num_rows //= layout.process_count
    prompts = [[split.prompts[int(i)] for i in mb] for mb in rows]
    firsts = [[split.completions[0][int(i)] for i in mb] for mb in rows]
    empty = np.zeros(0, np.int32)
    if not layout.pack_second:
        seconds = [[empty for _ in mb] for mb in rows]
    elif paired:
        seconds = [[split.completions[1][int(i)] for i in mb] for mb in rows]
    else:
        seconds = [[split.completions[0][int(i)] for i in mb] for mb in kl_rows(planned, layout)]
    batch = packing.pack_batch(
        prompts, firsts, seconds, names=packing.PAIRED_NAMES if paired else packing.UNPAIRED_NAMES,
        pack_length=pack_length, num_rows=num_rows, completion_length=planned.completion_len,
        pad_id=layout.pad_id, groups=groups, kl_share=0.0 if paired else layout.kl_share)
    if not paired:
        batch["desirable"] = split.desirable[rows]
        batch["weight"] = np.where(valid, split.weight[rows], 0.0).astype(np.float32)
    batch["valid"] = valid.copy()
    return as_batch(batch, paired)


def pad_rows(split: TokenizedSplit, rows: np.ndarray, valid: np.ndarray, planned: PlannedBatch,
             pad_id: int) -> dict:
    """Static-shape numpy arrays [A, M_local, ...] for the given example ids.

    `split` is a `TokenizedSplit`, or the `shards.RowTokens` of these rows (its
    prompts/completions are dicts id -> ids; desirable and weight global arrays).
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
        batch["desirable"] = split.desirable[rows]
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


def plan_stats(split, plan: EpochPlan, layout: BatchLayout) -> dict:
    """Padding efficiency and shape counts of a plan, over the whole global batches.

    `split`: a `TokenizedSplit` or `shards.ShardedSplit` (lengths and `desirable` only).

    efficiency = real tokens / padded tokens, where a batch's padded tokens are
    G * (P + C) (G * (P + 2C) for pairs) and filler rows count as padding: the arrays'.
    token_efficiency = real tokens / the positions the padded step computes per model pass,
    G x (P + C) per (x, y) row, twice when a second completion (y_kl, y_l) is computed:
    what `kto-jax data inspect` prints for both layouts (`packed_stats`' figures compare
    with it), as `kto-jax bench --layout=padded` counts them.
    All of it is order-free, so it is summed over the stored chunks (numpy, no loop).
    """
    sides, g = len(split.side_lengths), layout.global_batch
    real = int(split.prompt_lengths[plan.indices].sum(dtype=np.int64))
    for side in split.side_lengths:
        real += int(side[plan.indices].sum(dtype=np.int64))
    padded = g * int(plan.prompt_len.sum(dtype=np.int64)
                     + sides * plan.completion_len.sum(dtype=np.int64))
    pairs, counts = np.unique(np.stack([plan.prompt_len, plan.completion_len], 1), axis=0,
                              return_counts=True)
    shapes = {(int(p), int(c)): int(k) for (p, c), k in zip(pairs, counts)}
    single_class = 0
    if not split.paired and len(plan):
        desirable = plan.chunk_reduce(split.desirable[plan.indices], np.add)   # bool sums: int
        sizes = np.full(len(plan), g)
        sizes[-1] = len(plan.indices) - g * (len(plan) - 1)
        single_class = int(((desirable == 0) | (desirable == sizes)).sum())
    passes = 2 if layout.pack_second else 1
    computed = g * passes * int(plan.prompt_len.sum(dtype=np.int64)
                                + plan.completion_len.sum(dtype=np.int64))
    return {"efficiency": real / padded if padded else 0.0,
            "token_efficiency": real / computed if computed else 0.0, "shapes": shapes,
            "single_class_batches": single_class, "batches": len(plan),
            "filler_rows": len(plan) * g - len(plan.indices),
            "remainder_dropped": len(split) - len(plan.indices),
            **({"packed": packed_stats(split, plan, layout, real)} if layout.pack_length else {})}


def packed_stats(split, plan: EpochPlan, layout: BatchLayout, real: int) -> dict:
    """What the packed layout (data.packing) computes over a plan's batches, whose examples
    hold `real` tokens (`plan_stats`).

    Returns:
      rows: {(C, T, R): batches}: each distinct completion bucket C and row shape (T
        tokens, R rows) compiles the step once; positions: rows x T over every microbatch
        (+ rows x Tk of the kl rows, `layout.kl_share`);
      fill = tokens placed in the rows / positions (filler rows' copies and the y_kl
        copies count as placed);
      token_efficiency = real tokens / positions, where real tokens are the examples'
        own (x + y, or x + y_w + y_l), never padding, filler or y_kl copies;
      ceiling: the most token_efficiency can be with these trees, real / placed (below
        1 for the unpaired losses with z0: the y_kl copies are computed, not real);
    A Python loop over batches (first-fit decreasing per microbatch, as the pipeline
    packs): measured 0.86 s per 100k examples for the whole `plan_stats` (A = 4, M = 8,
    T = 2048, one idle CPU core).
    """
    placed = positions = 0
    rows: dict[tuple[int, int], int] = {}
    for b in range(len(plan)):
        planned = plan[b]
        t, r = batch_shape(tree_lengths(split, planned, layout), layout)
        rows[(planned.completion_len, t, r)] = rows.get((planned.completion_len, t, r), 0) + 1
        kl_rows = packing.kl_row_length(t, layout.kl_share) if layout.kl_share else 0
        positions += layout.accumulation * r * (t + kl_rows)
        placed += int(tree_lengths(split, planned, layout, placed=True).sum())
    return {"rows": dict(sorted(rows.items())), "positions": positions,
            "fill": placed / positions if positions else 0.0,
            "token_efficiency": real / positions if positions else 0.0,
            "ceiling": real / placed if placed else 0.0}
