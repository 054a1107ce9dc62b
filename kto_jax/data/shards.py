"""Per-process tokenization: global statistics by all-gather, tokens only where needed.

Phase 1 (start-up): process p tokenizes its slice [p*N/n, (p+1)*N/n) of a split's
normalised examples (by example index) into per-example int64 statistics rows
(kto_jax/data/tokenize.py: drop code, lengths, truncation counts, a CRC of the
ids) and keeps the tokens of that slice. The rows are all-gathered, so every
process holds the same global statistics: the same report, n_D / n_U, λ advice,
batch plans, padded shapes and fingerprint, as if it had tokenized everything.

Phase 2 (batch time, a grain map step): a process tokenizes the examples of its
rows of a batch that lie outside its slice (the slice's are cached; with one
process all of them are) and checks that their lengths equal the gathered ones.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import numpy as np

from kto_jax.data import tokenize
from kto_jax.data.formats import Examples
from kto_jax.data.tokenize import SplitLengths, TokenReport, TokenSpec, TokenizedSplit

AllGather = Callable[[np.ndarray], np.ndarray]   # [R, K] per process -> [n, R, K], process order


def slice_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[lo, hi): the examples process `process_index` tokenizes at start-up."""
    return n * process_index // process_count, n * (process_index + 1) // process_count


def jax_allgather(x: np.ndarray) -> np.ndarray:
    """`process_allgather` across the jax.distributed processes: [R, K] -> [n, R, K].

    int64 travels as pairs of int32 (jax without x64 would narrow it).
    """
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    halves = np.ascontiguousarray(x, np.int64).view(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(halves), np.int32)
    return np.ascontiguousarray(gathered).view(np.int64)


def gather_stats(local: np.ndarray, n: int, process_index: int, process_count: int,
                 allgather: AllGather | None) -> np.ndarray:
    """Every process's statistics rows, concatenated in example order: [n, N_STATS].

    Slices differ in size by at most one row, so each is padded to the largest.
    """
    if process_count == 1:
        return local
    per = -(-n // process_count)
    padded = np.full((per, tokenize.N_STATS), -1, np.int64)
    padded[:len(local)] = local
    gathered = np.asarray((allgather or jax_allgather)(padded))
    if gathered.shape != (process_count, per, tokenize.N_STATS):
        raise RuntimeError(f"all-gather returned shape {gathered.shape}, expected "
                           f"{(process_count, per, tokenize.N_STATS)}")
    parts = []
    for p in range(process_count):
        lo, hi = slice_bounds(n, p, process_count)
        parts.append(gathered[p, :hi - lo])
    out = np.concatenate(parts)
    lo, hi = slice_bounds(n, process_index, process_count)
    if not np.array_equal(out[lo:hi], local):
        raise RuntimeError("all-gather returned other statistics for this process's own slice")
    return out


class RowTokens(NamedTuple):
    """Tokens of a batch's example ids (dicts id -> int32 ids) and the global desirable/weight.

    Duck-types the part of `TokenizedSplit` that `batching.pad_rows` reads.
    """
    prompts: dict
    completions: tuple
    desirable: np.ndarray
    weight: np.ndarray
    paired: bool


@dataclasses.dataclass
class ShardedSplit(SplitLengths):
    """The kept examples of a split: global statistics, this process's tokens.

    Attributes:
      items: the kept `Example`s / `Pair`s, in global order (index = example id).
      prompt_lengths: int [N]; side_lengths: (completion,) or (chosen, rejected), int [N] each.
      desirable, weight: bool [N], f32 [N], as in `TokenizedSplit`.
      token_hash: int64 [N], CRC of each example's ids (the data fingerprint uses it).
      spec: how to tokenize an example again.
      cache: the tokens of examples [cache_start, cache_start + len(cache)), this
        process's start-up slice.
    """
    items: list
    prompt_lengths: np.ndarray
    side_lengths: tuple
    desirable: np.ndarray
    weight: np.ndarray
    token_hash: np.ndarray
    spec: TokenSpec
    cache_start: int
    cache: TokenizedSplit

    def __len__(self) -> int:
        return len(self.items)

    def row_tokens(self, rows: np.ndarray) -> RowTokens:
        """Tokens of the example ids in `rows` (any shape): cached, else tokenized now.

        Raises:
          RuntimeError: a re-tokenized example's lengths differ from the gathered
            ones (a non-deterministic tokenizer would break the batch shapes).
        """
        ids = np.unique(rows)
        local = ids - self.cache_start
        cached = (local >= 0) & (local < len(self.cache))
        sides = len(self.side_lengths)
        prompts = {int(i): self.cache.prompts[int(k)] for i, k in zip(ids[cached], local[cached])}
        completions = tuple({int(i): self.cache.completions[s][int(k)]
                             for i, k in zip(ids[cached], local[cached])} for s in range(sides))
        missing = ids[~cached]
        if len(missing):
            stats, tokens = tokenize.tokenize_items([self.items[i] for i in missing], self.spec,
                                                    note_boundary=False)
            self._check(missing, stats)
            for i, (prompt, side_ids) in zip(missing, tokens):
                prompts[int(i)] = prompt
                for s in range(sides):
                    completions[s][int(i)] = side_ids[s]
        return RowTokens(prompts, completions, self.desirable, self.weight, self.paired)

    def _check(self, ids: np.ndarray, stats: np.ndarray) -> None:
        expected = np.stack([self.prompt_lengths[ids], *(s[ids] for s in self.side_lengths)], 1)
        got = stats[:, tokenize.PROMPT:tokenize.SIDE0 + len(self.side_lengths)]
        if (stats[:, tokenize.CODE] != tokenize.KEPT).any() or not np.array_equal(got, expected):
            raise RuntimeError(f"tokenizing examples {ids[:5].tolist()} again gave other lengths "
                               "than at start-up: the tokenizer is not deterministic")


def tokenize_sharded(examples: Examples, spec: TokenSpec, *, process_index: int,
                     process_count: int, allgather: AllGather | None, on_overlong: str,
                     on_prefix_mismatch: str) -> tuple[ShardedSplit, TokenReport]:
    """Phase 1 for one split: tokenize this process's slice, all-gather the statistics.

    `examples` carry their desirable and weight columns (`formats.Examples`); the split
    keeps those of the examples tokenization kept.

    Returns:
      (split, report): identical on every process except `split.cache`.

    Raises:
      UserError: as `tokenize.tokenize_split`, on every process alike (the error
        policies are applied to the gathered statistics).
    """
    items = examples.items
    n = len(items)
    lo, hi = slice_bounds(n, process_index, process_count)
    local_stats, local_tokens = tokenize.tokenize_items(items[lo:hi], spec)
    stats = gather_stats(local_stats, n, process_index, process_count, allgather)
    report = tokenize.report_from_stats(items, stats, spec, on_overlong=on_overlong,
                                        on_prefix_mismatch=on_prefix_mismatch)
    kept = np.flatnonzero(stats[:, tokenize.CODE] == tokenize.KEPT)
    own = kept[(kept >= lo) & (kept < hi)]
    cache = tokenize.build_split(examples.subset(own), [local_tokens[i - lo] for i in own])
    sides = tuple(stats[kept, tokenize.SIDE0 + k] for k in range(1 + examples.paired))
    split = ShardedSplit([items[i] for i in kept], stats[kept, tokenize.PROMPT], sides,
                         examples.desirable[kept], examples.weight[kept],
                         stats[kept, tokenize.HASH], spec,
                         cache_start=int(np.searchsorted(kept, lo)), cache=cache)
    return split, report


class SplitData(NamedTuple):
    """One split's examples ready for batching, and what its summary reports about them."""
    name: str
    split: ShardedSplit     # or a `prepared.PreparedSplit` (same batching interface)
    source: str
    rows: int
    examples: int
    subsampled: dict
    report: TokenReport
