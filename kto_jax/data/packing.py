"""Packing one microbatch into fixed-length rows of [x | y | y2] trees (data.packing).

Why not grain's packers: grain 0.2.18 has FirstFitPackIterDataset,
BestFitPackIterDataset and ConcatThenSplitIterDataset (grain.experimental). They
pack a STREAM: an example joins whatever bins are open when it arrives, and the
bins are emitted (and shuffled) when one element no longer fits. Here the batch
plan (kto_jax/data/batching.py) has already fixed which M examples form each
microbatch, in which order, because z0 is estimated from the mismatched pairs
(x_i, y_{i+1 mod M}) of exactly that microbatch and the packed step must equal the
padded one on the same examples. Each example also carries a second completion
that is known only once that order is fixed (the next example's y), and y2's
positions restart at len(x), which grain's per-feature segment positions cannot
express. So this module packs a given microbatch, whole, into a given number of
rows.

Layout of one example (one segment of a row; kto_jax/models/packed_attention.py):
    tokens     x_0 .. x_{p-1} | y_0 .. y_{c-1} | y2_0 .. y2_{k-1}
    positions  0 .. p-1       | p .. p+c-1     | p .. p+k-1
    branch     0              | 1              | 2
y2 is y_{i+1 mod M} for an unpaired loss (the KL completion of the padded step: the
next real example, `kto_jax.batch.kl_partners`) and y_l for a paired loss ([x | y_w | y_l]).

Which examples share a row: first-fit decreasing over the microbatch's examples
(longest tree first, ties in plan order), each tree whole in one row, never split.
With `groups` > 1 the microbatch is cut into `groups` equal contiguous blocks of
examples (one per batch shard: devices along ('data', 'fsdp')), each packed into
its own num_rows / groups rows, so gathering an example's log-probs never reads
another shard's rows. The per-example gather indices are local to the group:
row_in_group * pack_length + column.
"""

from __future__ import annotations

from typing import Sequence

import math

import numpy as np

from kto_jax.batch import KL_ROW_KEYS, PAIRED_NAMES, ROW_KEYS, UNPAIRED_NAMES, kl_partners

BRANCH_PROMPT, BRANCH_FIRST, BRANCH_SECOND = 0, 1, 2  # as kto_jax/models/packed_attention.py
STEP_RUNS_PACKED = True  # the train step runs packed batches (kto_jax/step/stats.py)


def kl_completions(completions: Sequence[np.ndarray],
                   valid: Sequence[bool] | None = None) -> list[np.ndarray]:
    """The KL completions of a microbatch: example i gets y_{i+1 mod M}, wrapping around the
    real examples when `valid` marks filler (`kto_jax.batch.kl_partners`, the step's rule)."""
    if valid is None:
        return list(completions[1:]) + list(completions[:1])
    return [completions[int(j)] for j in kl_partners(np.asarray(valid, bool))]


def assign_rows(lengths: np.ndarray, pack_length: int, groups: int = 1
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """First-fit decreasing placement of trees of `lengths` tokens in rows of `pack_length`.

    Args:
      lengths: int [M], tokens of each example's tree, len(x) + len(y) + len(y2).
      pack_length: T, tokens per row.
      groups: the examples are packed in `groups` equal contiguous blocks, each into
        rows of its own.
    Returns:
      (row int [M]: row index within the example's group, offset int [M]: first
      column, rows_per_group: the most rows any group used).
    Raises:
      ValueError: a tree longer than pack_length, or M not a multiple of groups.
    """
    lengths = np.asarray(lengths, np.int64)
    m = len(lengths)
    if groups < 1 or m % groups:
        raise ValueError(f"{m} examples cannot be cut into {groups} equal packing groups")
    if m and lengths.max() > pack_length:
        i = int(lengths.argmax())
        raise ValueError(f"example {i} needs {int(lengths[i])} tokens as [x | y | y2], more "
                         f"than pack_length={pack_length}")
    row, offset = np.zeros(m, np.int64), np.zeros(m, np.int64)
    used = 0
    size = m // groups
    for g in range(groups):
        block = np.arange(g * size, (g + 1) * size)
        fill: list[int] = []
        for i in block[np.argsort(-lengths[block], kind="stable")]:
            r = next((r for r, f in enumerate(fill) if f + lengths[i] <= pack_length), len(fill))
            if r == len(fill):
                fill.append(0)
            row[i], offset[i] = r, fill[r]
            fill[r] += int(lengths[i])
        used = max(used, len(fill))
    return row, offset, used


def rows_needed(lengths: np.ndarray, pack_length: int, groups: int = 1) -> int:
    """Rows (all groups together) that `pack_trees` needs for trees of these lengths."""
    return groups * assign_rows(lengths, pack_length, groups)[2]


def pack_trees(prompts: Sequence[np.ndarray], firsts: Sequence[np.ndarray],
               seconds: Sequence[np.ndarray], *, pack_length: int, num_rows: int,
               completion_length: int, pad_id: int, groups: int = 1,
               names: tuple[str, str] = UNPAIRED_NAMES) -> dict[str, np.ndarray]:
    """One microbatch of M examples [x | y | y2] as packed rows plus per-example gathers.

    Args:
      prompts, firsts, seconds: M token-id sequences each, in plan order (prompts
        need at least one token: the last prompt token predicts both y_0 and y2_0).
      pack_length: T, tokens per row; num_rows: R, rows of the microbatch (a multiple
        of groups, at least `rows_needed`).
      completion_length: C, the padded length of the per-example arrays (>= every y, y2).
      pad_id: token id written into padding.
      groups: packing groups (module docstring); divides M and R.
      names: key prefixes of y and y2: ("completion", "kl") or ("chosen", "rejected").
    Returns:
      packed_ids, packed_positions, packed_segment_ids, packed_branch_ids: int32 [R, T];
      for each name n: n_ids int32 [M, C] (right-padded tokens), n_mask int32 [M, C],
      n_index int32 [M, C]: the group-local flat index row * T + column of the hidden
      state that predicts token j (0 on padding); prompt_length int32 [M].
    Raises:
      ValueError: a tree or completion that does not fit, or too few rows.
    """
    m = len(prompts)
    lp, l1, l2 = _checked_lengths(prompts, firsts, seconds, completion_length)
    row, offset, used = assign_rows(lp + l1 + l2, pack_length, groups)
    if num_rows % groups or used > num_rows // groups:
        raise ValueError(f"the microbatch needs {used * groups} rows of {pack_length} tokens "
                         f"({groups} group(s)), got num_rows={num_rows}")
    t, per_group = pack_length, num_rows // groups
    out = {"packed_ids": np.full((num_rows, t), pad_id, np.int32)}
    for key in ROW_KEYS[1:]:
        out[key] = np.zeros((num_rows, t), np.int32)
    for n in names:
        out[f"{n}_ids"] = np.full((m, completion_length), pad_id, np.int32)
        out[f"{n}_mask"] = np.zeros((m, completion_length), np.int32)
        out[f"{n}_index"] = np.zeros((m, completion_length), np.int32)
    segments = np.zeros(num_rows, np.int64)  # segments placed so far per row
    for i in np.lexsort((offset, row + (np.arange(m) // (m // groups)) * per_group)):
        r = int(row[i] + (i // (m // groups)) * per_group)   # row in the microbatch
        s, p, c = int(offset[i]), int(lp[i]), int(l1[i])
        segments[r] += 1
        spans = ((prompts[i], 0, BRANCH_PROMPT), (firsts[i], p, BRANCH_FIRST),
                 (seconds[i], p, BRANCH_SECOND))
        col = s
        for tokens, first_position, branch in spans:
            end = col + len(tokens)
            out["packed_ids"][r, col:end] = tokens
            out["packed_positions"][r, col:end] = first_position + np.arange(len(tokens))
            out["packed_segment_ids"][r, col:end] = segments[r]
            out["packed_branch_ids"][r, col:end] = branch
            col = end
        base = int(row[i]) * t + s + p - 1        # group-local index of the last prompt token
        for n, tokens, start in ((names[0], firsts[i], base), (names[1], seconds[i], base + c)):
            j = np.arange(len(tokens))
            out[f"{n}_ids"][i, :len(tokens)] = tokens
            out[f"{n}_mask"][i, :len(tokens)] = 1
            # token 0 of both completions is predicted by x's last token; token j > 0 by
            # the token before it in its own span
            out[f"{n}_index"][i, :len(tokens)] = np.where(j == 0, base, start + j)
    out["prompt_length"] = lp.astype(np.int32)
    return out


def pack_unpaired(prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray],
                  valid: Sequence[bool] | None = None, **kwargs) -> dict[str, np.ndarray]:
    """`pack_trees` of [x_i | y_i | y_{i+1 mod M}] (keys completion_*, kl_*); with `valid`,
    the KL completions wrap around the real examples (`kl_completions`).

    The roll is within the given list: with several processes, pass the globally
    rolled KL completions to `pack_trees` instead (process p's last example pairs
    with process p+1's first).
    """
    return pack_trees(prompts, completions, kl_completions(completions, valid),
                      names=UNPAIRED_NAMES, **kwargs)


def pack_paired(prompts: Sequence[np.ndarray], chosen: Sequence[np.ndarray],
                rejected: Sequence[np.ndarray], **kwargs) -> dict[str, np.ndarray]:
    """`pack_trees` of [x | y_w | y_l] (keys chosen_*, rejected_*)."""
    return pack_trees(prompts, chosen, rejected, names=PAIRED_NAMES, **kwargs)


def kl_row_length(pack_length: int, kl_share: float) -> int:
    """Tk, tokens per kl row of rows of T = `pack_length` tokens: kl_share * T rounded up to 8."""
    return int(-(-int(math.ceil(kl_share * pack_length)) // 8) * 8)


KL_SHARE_STEP = 16   # kl_share is a multiple of 1/16


def kl_share_for(main: np.ndarray, kl: np.ndarray) -> float:
    """The kl rows' share of the main rows' length for examples of these [x | y] and y_kl
    lengths: their token ratio, rounded up to a multiple of 1/KL_SHARE_STEP (at most 1)."""
    ratio = float(np.sum(kl)) / max(float(np.sum(main)), 1.0)
    return min(1.0, max(1, math.ceil(ratio * KL_SHARE_STEP - 1e-9)) / KL_SHARE_STEP)


def stream_lengths(main: np.ndarray, kl: np.ndarray, kl_share: float) -> np.ndarray:
    """int [...]: the share of a row of T tokens an example of the two-stream layout takes,
    in tokens of T: max(len(x) + len(y), ceil(len(y_kl) / kl_share)).

    First-fit of these in rows of T keeps both streams within their rows: the main
    parts sum to at most T, the KL parts to at most kl_share * T <= Tk (`kl_row_length`).
    """
    main, kl = np.asarray(main, np.int64), np.asarray(kl, np.int64)
    return np.maximum(main, np.ceil(kl / kl_share - 1e-9).astype(np.int64))


def pack_streams(prompts: Sequence[np.ndarray], firsts: Sequence[np.ndarray],
                 kl: Sequence[np.ndarray], *, pack_length: int, kl_share: float, num_rows: int,
                 completion_length: int, pad_id: int, groups: int = 1) -> dict[str, np.ndarray]:
    """One microbatch of M unpaired examples as main rows [x | y] and parallel kl rows.

    The layout of the losses that read the KL completions (loss.uses_kl): main row r
    [T] holds whole examples [x | y] (branch ids 0 on x, 1 on y: plain segments, no
    tree); kl row r [Tk] (Tk = `kl_row_length(T, kl_share)`) holds the KL completions
    y_kl of the same examples, each with its example's segment id and positions
    len(x) .. (they continue x). The kl rows run without gradient and attend the main
    row's x keys (kto_jax/models/transformer.py), so y_kl never rides the backward.
    Which examples share a row: `assign_rows` of `stream_lengths`.

    Args and the per-example gathers as `pack_trees`, with `kl` the KL completions
    (`kl_completions`). kl_index: token 0 is predicted by x's last token in the main
    row (index into the main rows, group-local); token j > 0 by the kl row token
    before it, at (R / groups) * T + kl_row_in_group * Tk + column (the group's main
    rows then its kl rows, flattened: `kto_jax.models.packed_logprobs.gather_hidden`).
    Returns pack_trees' keys (no branch 2) plus kl_row_ids, kl_row_positions,
    kl_row_segment_ids int32 [R, Tk].
    """
    m = len(prompts)
    lp, l1, l2 = _checked_lengths(prompts, firsts, kl, completion_length)
    t, tk = pack_length, kl_row_length(pack_length, kl_share)
    row, _, used = assign_rows(stream_lengths(lp + l1, l2, kl_share), t, groups)
    if num_rows % groups or used > num_rows // groups:
        raise ValueError(f"the microbatch needs {used * groups} rows of {t} tokens "
                         f"({groups} group(s)), got num_rows={num_rows}")
    per_group = num_rows // groups
    out = {"packed_ids": np.full((num_rows, t), pad_id, np.int32),
           "kl_row_ids": np.full((num_rows, tk), pad_id, np.int32)}
    for key in ROW_KEYS[1:]:
        out[key] = np.zeros((num_rows, t), np.int32)
    for key in KL_ROW_KEYS[1:]:
        out[key] = np.zeros((num_rows, tk), np.int32)
    for n in UNPAIRED_NAMES:
        for k in ("ids", "mask", "index"):
            out[f"{n}_{k}"] = np.full((m, completion_length), pad_id if k == "ids" else 0, np.int32)
    fill = np.zeros((num_rows, 2), np.int64)       # columns used per row: main, kl
    segments = np.zeros(num_rows, np.int64)        # examples placed so far per row
    for i in range(m):   # plan order within each row (segment ids 1, 2, ... in that order)
        g = i // (m // groups)
        r = int(row[i] + g * per_group)
        s, sk, p, c, k = int(fill[r, 0]), int(fill[r, 1]), int(lp[i]), int(l1[i]), int(l2[i])
        segments[r] += 1
        seg = int(segments[r])
        out["packed_ids"][r, s:s + p + c] = np.concatenate([prompts[i], firsts[i]])
        out["packed_positions"][r, s:s + p + c] = np.arange(p + c)
        out["packed_segment_ids"][r, s:s + p + c] = seg
        out["packed_branch_ids"][r, s + p:s + p + c] = BRANCH_FIRST
        out["kl_row_ids"][r, sk:sk + k] = kl[i]
        out["kl_row_positions"][r, sk:sk + k] = p + np.arange(k)
        out["kl_row_segment_ids"][r, sk:sk + k] = seg
        fill[r] += (p + c, k)
        base = int(row[i]) * t + s + p - 1        # group-local index of the last prompt token
        kl_base = per_group * t + int(row[i]) * tk + sk
        for n, tokens, start in ((UNPAIRED_NAMES[0], firsts[i], base + 1),
                                 (UNPAIRED_NAMES[1], kl[i], kl_base)):
            j = np.arange(len(tokens))
            out[f"{n}_ids"][i, :len(tokens)] = tokens
            out[f"{n}_mask"][i, :len(tokens)] = 1
            out[f"{n}_index"][i, :len(tokens)] = np.where(j == 0, base, start + j - 1)
    out["prompt_length"] = lp.astype(np.int32)
    return out


def microbatch_rows(tree_lengths: np.ndarray, pack_length: int, groups: int = 1) -> int:
    """R for a batch [A, M]: the rows its fullest microbatch needs (all groups together).

    `tree_lengths` int [A, M] are GLOBAL (every example of each microbatch, in slot
    order), so every process computes the same R, the static row count of its share.
    """
    return max((rows_needed(t, pack_length, groups) for t in np.asarray(tree_lengths)),
               default=groups)


def pack_batch(prompts: Sequence[Sequence[np.ndarray]], firsts: Sequence[Sequence[np.ndarray]],
               seconds: Sequence[Sequence[np.ndarray]], *, names: tuple[str, str],
               kl_share: float = 0.0, **kwargs) -> dict[str, np.ndarray]:
    """`pack_trees` of each of A microbatches ([A][M] token sequences each), stacked [A, ...];
    with `kl_share` > 0 (unpaired losses with z0) `pack_streams` instead.

    kwargs are `pack_trees`'s (pack_length, num_rows, completion_length, pad_id, groups);
    num_rows must hold every microbatch (`microbatch_rows`). For the unpaired losses
    `seconds` are the KL completions, paired within each GLOBAL microbatch
    (`kto_jax.data.batching.kl_rows`: the next real example, as the padded step).
    """
    if kl_share > 0:
        assert names == UNPAIRED_NAMES, "the kl stream holds the KL completions of unpaired losses"
        per = [pack_streams(p, f, s, kl_share=kl_share, **kwargs)
               for p, f, s in zip(prompts, firsts, seconds)]
    else:
        per = [pack_trees(p, f, s, names=names, **kwargs) for p, f, s in zip(prompts, firsts, seconds)]
    return {k: np.stack([b[k] for b in per]) for k in per[0]}


def packed_prompts(batch, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The prompts of a packed batch [A, ...] read back from its rows, left-padded as in the
    padded layout: (ids, mask) int32 [A, M, P], P the longest prompt.

    `groups`: the batch's packing groups (of this process's share). The last prompt token
    of example i sits where its first completion token's gather index points (or its
    second's, when the first completion is empty). What the reference store's row
    checksums read (kto_jax/train/reference_store.py), so they see the same tokens
    whatever the layout.
    """
    rows = np.asarray(batch["packed_ids"])
    a, r, t = rows.shape
    names = PAIRED_NAMES if "chosen_index" in batch else UNPAIRED_NAMES
    first, second = (np.asarray(batch[f"{n}_index"])[..., 0] for n in names)
    last = np.where(np.asarray(batch[f"{names[0]}_mask"])[..., 0] > 0, first, second)  # [A, M]
    length = np.asarray(batch["prompt_length"])
    m, p = length.shape[1], max(int(length.max()), 1)
    col = np.arange(p)
    mask = col >= p - length[..., None]                                    # [A, M, P]
    where = np.where(mask, last[..., None] - (p - 1 - col), 0)
    group = np.broadcast_to((np.arange(m) // (m // groups))[None, :, None], where.shape)
    flat = rows.reshape(a, groups, (r // groups) * t)
    ids = flat[np.arange(a)[:, None, None], group, where] * mask
    return ids.astype(np.int32), mask.astype(np.int32)


def config_problems(data) -> list[str]:
    """What is wrong with the data settings' packing fields, as phrases for one UserError."""
    enabled, t = data.packing, data.pack_length
    if not isinstance(enabled, bool):
        return [f"data.packing={enabled!r} must be True or False"]
    if not enabled:
        return []
    if not isinstance(t, int) or t < 0 or t % 128:
        return [f"data.pack_length={t!r} must be 0 (chosen from the data) or a positive "
                "multiple of 128 (the splash attention block; cuDNN wants multiples of 64)"]
    if not STEP_RUNS_PACKED:
        return ["data.packing=True is not run by the train step yet (the packer and packed "
                "attention exist, the step integration does not): set data.packing=False"]
    return []


def _checked_lengths(prompts, firsts, seconds, completion_length: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int64 [M] x 3: the lengths of x, y and y2; ValueError on an empty prompt or a completion
    longer than `completion_length`."""
    lp, l1, l2 = (np.array([len(s) for s in seqs], np.int64) for seqs in (prompts, firsts, seconds))
    if len(lp) and lp.min() < 1:
        raise ValueError(f"example {int(lp.argmin())} has an empty prompt")
    if len(lp) and max(l1.max(), l2.max()) > completion_length:
        raise ValueError(f"a completion of {int(max(l1.max(), l2.max()))} tokens exceeds "
                         f"completion_length={completion_length}")
    return lp, l1, l2
