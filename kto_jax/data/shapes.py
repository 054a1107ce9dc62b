"""Step shapes chosen from the training data's lengths (data.bucket_lengths=() and
data.pack_length=0, the defaults).

Every distinct batch shape compiles the train step once, and every padded position is
computed like a real token, so the shapes decide both the compile count and the waste.
Fixed buckets suit nobody: (256, 512, 1024) pads a file of 20-token rows to 256 + 256.
So by default the shapes are read off the training split's length histogram, the
figures `kto-jax data inspect` prints:

- padded layout: each global batch is padded to its longest prompt and longest
  completion, rounded up to a bucket. The buckets are chosen so the epoch's padded
  positions, sum over batches of G x (P_b + C_b), are smallest, with at most
  `MAX_SHAPES` distinct (P, C) programs: for every split kp x kc <= MAX_SHAPES, an
  exact dynamic programme picks kp prompt and kc completion buckets among the
  batches' rounded maxima (the prompt and completion costs are separable), and the
  split with the fewest positions wins, each extra program having to save
  `SHAPE_GAIN` of them.
- packed layout: at most `MAX_SHAPES` row shapes (T, R), R rows of T tokens per
  microbatch, chosen greedily for the fewest row positions over epoch 0's batches (T
  among multiples of the rounding from the smallest that holds the data's longest
  [x | y | y2] tree), one of them a catch-all no microbatch can exceed; each batch
  takes the cheapest shape that holds it (`packed_shapes`), so a run compiles at most
  that many programs.

Lengths are rounded to what the backend's kernels like (`backend_multiple`): 128 on
TPU (the splash attention block) and GPU (cuDNN), 4 on CPU, where nothing asks for
more (short rows: 10 tokens pad to 12, not 16). Explicit data.bucket_lengths /
data.pack_length win; TPU pods that compile ahead of time (`kto-jax compile`) should set
them (docs/data.md, "Buckets").
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kto_jax.data import batching, packing

MAX_SHAPES = 4          # distinct step programs a run compiles for its training batches
SHAPE_GAIN = 0.02       # an extra program must save this share of the padded positions
PLAN_SAMPLE = 256       # batches of epoch 0 that the packed choices are measured on
PACK_CANDIDATES = 24    # row lengths tried, from the smallest legal one to a whole microbatch


def backend_multiple(backend: str) -> int:
    """The rounding of chosen lengths for a JAX backend ("tpu", "gpu", "cuda", "cpu", ...)."""
    return 4 if backend == "cpu" else 128


def round_up(n, multiple: int):
    """n (int or int array) rounded up to a multiple of `multiple`."""
    return -(-np.asarray(n) // multiple) * multiple


def _best_buckets(maxima: np.ndarray, k: int) -> tuple[tuple[int, ...], int]:
    """The k values (or fewer) among `maxima` minimising sum_b min{bucket >= maxima[b]}.

    An exact dynamic programme over the sorted distinct values u_1 < ... < u_n (u_n is
    always a bucket): cost[j][i] = best cost of covering values <= u_i with j buckets,
    the last at u_i. O(k n^2), n distinct batch maxima (a few hundred at most).
    Returns (buckets ascending, cost).
    """
    values, counts = np.unique(np.asarray(maxima, np.int64), return_counts=True)
    n = len(values)
    below = np.concatenate([[0], np.cumsum(counts)])          # batches with value < u_i
    inf = np.iinfo(np.int64).max // 4
    cost = np.full((k + 1, n), inf, np.int64)
    back = np.zeros((k + 1, n), np.int64)
    cost[1] = values * below[1:]                              # one bucket at u_i covers all <= u_i
    for j in range(2, k + 1):
        for i in range(n):
            for h in range(i):                                # previous bucket at u_h
                c = cost[j - 1][h] + values[i] * (below[i + 1] - below[h + 1])
                if c < cost[j][i]:
                    cost[j][i], back[j][i] = c, h
    j = int(np.argmin(cost[1:, n - 1])) + 1
    total, i, picked = int(cost[j][n - 1]), n - 1, []
    while j >= 1:
        picked.append(int(values[i]))
        i, j = int(back[j][i]), j - 1
    return tuple(sorted(set(picked))), total


@dataclasses.dataclass(frozen=True)
class Choice:
    """Shapes chosen from the data, and what they cost (printed at start-up)."""
    prompt_buckets: tuple[int, ...]
    completion_buckets: tuple[int, ...]
    multiple: int
    pack_shapes: tuple[tuple[int, int], ...] = ()   # packed layout: (T, R) per microbatch
    kl_share: float = 0.0   # kl rows of kl_share * T beside the rows (losses with z0)

    def line(self) -> str:
        if self.pack_shapes:
            rows = ", ".join(f"{t}x{r}" for t, r in self.pack_shapes)
            kl = (f" (each beside a kl row of {self.kl_share:g} T: the KL completions, run "
                  "without a backward)" if self.kl_share else "")
            return (f"  shapes chosen from the data (multiples of {self.multiple}): packed rows "
                    f"TxR per microbatch {rows}{kl}; completion buckets "
                    f"{list(self.completion_buckets)}")
        return (f"  shapes chosen from the data (multiples of {self.multiple}): prompt buckets "
                f"{list(self.prompt_buckets)}, completion buckets {list(self.completion_buckets)}")


def padded_buckets(prompt_lengths: np.ndarray, completion_lengths: np.ndarray,
                   layout: batching.BatchLayout, *, multiple: int, caps: tuple[int, int],
                   seed: int, max_shapes: int = MAX_SHAPES) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Prompt and completion buckets for the padded layout (module docstring).

    The batches are epoch 0's, planned with every multiple of `multiple` as a bucket
    (lengths are capped by `caps` = (max_prompt_length, max completion) already).
    """
    fine = tuple(tuple(int(b) for b in np.arange(multiple, round_up(cap, multiple) + 1, multiple))
                 for cap in caps)
    fine_layout = dataclasses.replace(layout, prompt_buckets=fine[0], completion_buckets=fine[1],
                                      pack_length=0)
    plan = batching.plan_epoch(prompt_lengths, completion_lengths, fine_layout, seed=seed, epoch=0)
    p_max = np.minimum(plan.prompt_len, caps[0])
    c_max = np.minimum(plan.completion_len, caps[1])
    best = None
    for kp in range(1, max_shapes + 1):
        for kc in range(1, max_shapes // kp + 1):
            pb, pc = _best_buckets(p_max, kp)
            cb, cc = _best_buckets(c_max, kc)
            shapes = len(set(zip(pb_of(p_max, pb), pb_of(c_max, cb))))
            score = (pc + cc) * (1 + SHAPE_GAIN * (shapes - 1))
            if best is None or score < best[0]:
                best = (score, pb, cb)
    return best[1], best[2]


def pb_of(maxima: np.ndarray, buckets: Sequence[int]) -> list[int]:
    """The bucket each maximum falls in (the smallest >= it)."""
    b = np.asarray(buckets)
    return b[np.searchsorted(b, maxima, side="left")].tolist()


def tree_bounds(split, pack_second: bool, kl_share: float = 0.0) -> np.ndarray:
    """int [N]: at least the tokens of each example's [x | y | y2] tree, whichever its KL
    partner: y2 is the example's own y_l for pairs; for an unpaired loss with z0 another
    example's completion, so x + y + the longest y (with the kl stream, `kl_share` > 0:
    its `packing.stream_lengths` with the longest y). Their max is the smallest legal T."""
    first = np.asarray(split.prompt_lengths, np.int64) + split.side_lengths[0]
    if kl_share:
        return packing.stream_lengths(first, int(np.max(split.side_lengths[0])), kl_share)
    if not pack_second:
        return first
    if len(split.side_lengths) > 1:
        return first + split.side_lengths[1]
    return first + int(np.max(split.side_lengths[0]))


def _sampled_trees(split, plan: batching.EpochPlan, layout: batching.BatchLayout) -> list[np.ndarray]:
    """Tree lengths [A, M] of up to PLAN_SAMPLE batches of the plan, evenly spread."""
    picks = np.unique(np.linspace(0, len(plan) - 1, min(len(plan), PLAN_SAMPLE)).astype(int))
    return [batching.tree_lengths(split, plan[int(b)], layout) for b in picks]


def most_rows(trees_bound: np.ndarray, pack_length: int, micro_batch: int, groups: int) -> int:
    """Rows that no microbatch of `micro_batch` examples can need, given an upper bound on
    each example's tree: per group, first-fit leaves at most one row half empty or less,
    so it uses fewer than 2 S / T + 1 rows for trees of S tokens (and at most one a tree);
    S is at most the group's share of the longest trees."""
    per_group = micro_batch // groups
    longest = np.sort(np.asarray(trees_bound, np.int64))[::-1][:per_group]
    return groups * min(per_group, int(2 * int(longest.sum()) // pack_length) + 1)


def row_length_candidates(trees: Sequence[np.ndarray], low: int, multiple: int) -> list[int]:
    """The row lengths T worth trying for batches of trees [A, M]: up to PACK_CANDIDATES
    multiples of `multiple`, evenly spread from `low` (the longest tree) rounded up to a row
    that holds the fullest microbatch whole (longer is never better)."""
    low = int(round_up(low, multiple))
    whole = max(int(round_up(max(int(t.sum(-1).max()) for t in trees), multiple)), low)
    spread = round_up(np.linspace(low, whole, PACK_CANDIDATES), multiple)
    return sorted({int(t) for t in spread})


def best_row_length(trees: np.ndarray, low: int, multiple: int, groups: int = 1) -> int:
    """The T among `row_length_candidates` whose rows hold one batch of trees [A, M] in the
    fewest positions, R x T (`kto-jax bench` picks its rows so)."""
    return min(row_length_candidates([trees], low, multiple),
               key=lambda t: (packing.microbatch_rows(trees, t, groups) * t, t))


def packed_shapes(split, layout: batching.BatchLayout, *, multiple: int, seed: int,
                  pack_length: int = 0, max_shapes: int = MAX_SHAPES
                  ) -> tuple[tuple[int, int], ...]:
    """At most `max_shapes` packed shapes (T, R), cheapest first: each batch takes the
    cheapest that holds it (`batching.batch_shape`).

    The first is a catch-all: the smallest legal T (`layout.pack_length`, or the given
    pack_length) with the rows no microbatch can exceed (`most_rows`), so batches unseen
    here (later epochs) find a shape too and a run never compiles more than `max_shapes`
    programs. The others are added greedily, each the (T, R) that most lowers the row
    positions of epoch 0's batches (a sample of PLAN_SAMPLE), T among
    `row_length_candidates` (or the given pack_length alone), R among the rows those
    batches need at that T.
    """
    plan = batching.plan_epoch(split.prompt_lengths, split.completion_lengths, layout,
                               seed=seed, epoch=0)
    trees = _sampled_trees(split, plan, layout)
    groups = layout.pack_groups
    low = int(pack_length or layout.pack_length)
    candidates = [low] if pack_length else row_length_candidates(trees, low, multiple)
    need = np.array([[packing.microbatch_rows(t, c, groups) for c in candidates] for t in trees])
    most = most_rows(tree_bounds(split, layout.pack_second, layout.kl_share), low,
                     layout.micro_batch, groups)
    chosen = [(low, max(most, int(need[:, 0].max())))]
    cost = np.full(len(trees), chosen[0][0] * chosen[0][1], np.int64)
    for _ in range(max_shapes - 1):
        best = None
        for k, t in enumerate(candidates):
            for r in np.unique(need[:, k]):
                if (t, int(r)) in chosen:
                    continue
                new = np.where(need[:, k] <= r, np.minimum(cost, t * int(r)), cost)
                if best is None or new.sum() < best[0]:
                    best = (int(new.sum()), (t, int(r)), new)
        if best is None or best[0] >= int(cost.sum()):
            break
        cost = best[2]
        chosen.append(best[1])
    return tuple(sorted(chosen, key=lambda s: (s[0] * s[1], s[0])))


def choose(d, layout: batching.BatchLayout, train, evaluation=None, *, multiple: int
           ) -> tuple[batching.BatchLayout, Choice | None]:
    """The layout with the shapes the data asks for (module docstring), and the choice made
    (None when the config fixed every shape).

    Args:
      d: the run's DataSettings (bucket_lengths () and pack_length 0 ask for a choice).
      layout: the layout of the configured shapes (`pipeline.batch_layout`).
      train, evaluation: the splits' lengths (`SplitLengths`; evaluation may be None): the
        choice is the train split's, its largest buckets also hold the eval split's lengths.
      multiple: the rounding (`backend_multiple`).
    Raises:
      UserError: an explicit data.pack_length shorter than the data's longest tree.
    """
    caps = (d.max_prompt_length, d.max_completion_length or d.max_length)
    chosen = None
    if not d.bucket_lengths:
        splits = [s for s in (train, evaluation) if s is not None]
        top = tuple(min(int(round_up(max(int(np.max(lengths(s))) for s in splits), multiple)),
                        cap) for lengths, cap in zip((_prompts, _completions), caps))
        if d.packing:   # the rows decide the cost; C only sizes the gathers
            prompt, completion = (top[0],), (top[1],)
        else:
            prompt, completion = padded_buckets(train.prompt_lengths, train.completion_lengths,
                                                layout, multiple=multiple, caps=caps, seed=d.seed)
            prompt, completion = (tuple(b for b in bs if b < t) + (t,)
                                  for bs, t in ((prompt, top[0]), (completion, top[1])))
        layout = dataclasses.replace(layout, prompt_buckets=prompt, completion_buckets=completion)
        chosen = Choice(prompt, completion, multiple)
    if d.packing:
        layout = _packed(d, layout, train, evaluation, multiple)
        chosen = Choice(layout.prompt_buckets, layout.completion_buckets, multiple,
                        layout.pack_shapes, layout.kl_share)
    return layout, chosen


def _prompts(split) -> np.ndarray:
    return split.prompt_lengths


def _completions(split) -> np.ndarray:
    return split.completion_lengths


def _packed(d, layout: batching.BatchLayout, train, evaluation, multiple: int
            ) -> batching.BatchLayout:
    """The packed layout's shapes (T, R): T data.pack_length, or chosen (`packed_shapes`)."""
    from kto_jax.errors import UserError  # pylint: disable=import-outside-toplevel
    paired = len(train.side_lengths) > 1
    if layout.pack_second and not paired:   # y_kl in kl rows (packing.pack_streams)
        main = np.asarray(train.prompt_lengths, np.int64) + train.side_lengths[0]
        layout = dataclasses.replace(layout, kl_share=packing.kl_share_for(main, train.side_lengths[0]))
    longest = max(int(tree_bounds(s, layout.pack_second, layout.kl_share).max())
                  for s in (train, evaluation) if s is not None)
    if d.pack_length and d.pack_length < longest:
        tree = ("[x | y_w | y_l]" if paired else
                f"[x | y] beside y_kl in kl rows of {layout.kl_share:g} T" if layout.kl_share
                else "[x | y]")
        raise UserError(f"data.pack_length={d.pack_length} cannot hold the data's longest "
                        f"{tree} tree, {longest} tokens: raise data.pack_length to "
                        f"{int(round_up(longest, 128))} or more, or set data.pack_length=0 to "
                        "choose it from the data")
    layout = dataclasses.replace(layout, pack_length=int(d.pack_length or round_up(longest, multiple)))
    pack_shapes = packed_shapes(train, layout, multiple=multiple, seed=d.seed,
                                pack_length=int(d.pack_length))
    return dataclasses.replace(layout, pack_shapes=pack_shapes)
