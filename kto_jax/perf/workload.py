"""The benchmark's examples and how a step lays them out: length distributions, layouts, token counts.

`kto-jax bench --lengths=NAME|FILE --layout=padded|packed|packed_shared` (kto_jax/perf/bench.py).

Lengths. A global batch of A x M examples gets (prompt_len, completion_len) pairs drawn,
seeded, from a distribution: a named one shipped with the package (`NAMED`: the token-length
histogram of a public feedback data set, made by scripts/length_histogram.py; source and
counts in docs/performance.md), or a user's file:
  - `.csv`: a header naming `prompt_len,completion_len` (and optionally `count`), then one
    row per sample;
  - `.jsonl`: one object per line, {"prompt_len": P, "completion_len": C} (optional "count");
  - `.json`: a histogram in the shipped files' format ({"bin_width": W, "bins":
    [[prompt_low, completion_low, count], ...]}).
Rows (or bins) are drawn in proportion to `count` (1 when absent); a histogram bin then gives
lengths uniformly in [low, low + W). Lengths above the caps (--prompt-len, --completion-len)
are truncated as the trainer truncates (data.max_prompt_length, max_completion_length), and
the number truncated is reported. Token ids are random (>= 3); only the lengths matter.

Layouts of the same examples (one microbatch of M examples, its KL completions
y_kl_i = y_{i+1 mod M} as in the step):
  padded         today's step: prompts left-padded to P, completions right-padded to C (P, C:
                 the batch's longest, rounded up to --bucket); the policy runs (x, y) and
                 (x, y_kl) as 2M rows of P + C positions, so every prompt is computed twice
                 per model.
  packed         rows of T tokens (kto_jax/data/packing.py), each example as two segments,
                 [x | y] and [x | y_kl]: no padding waste, but x still computed twice. Run by
                 the step's packed path, which reads the per-example gather indices and does
                 not care that y and y_kl of one example sit in different segments.
  packed_shared  the packed layout the trainer runs for the loss (x computed once), built by
                 the data pipeline's own packer (kto_jax/data/packing.py `pack_batch`, as
                 kto_jax/data/batching.py `pack_rows` calls it): for a loss with z0
                 (loss.uses_kl) main rows of T tokens holding [x | y] beside kl rows of Tk =
                 kl_share * T tokens holding y_kl (`pack_streams`; kl_share from the batch's
                 token ratio, `packing.kl_share_for`); for a loss without z0 rows of [x | y]
                 alone (no y_kl). (Paired losses pack [x | y_w | y_l] trees; the benchmark
                 runs unpaired losses only.)
The packed rows of a microbatch are packed in `groups` blocks, one per batch shard, by the
pipeline's own `packing.pack_batch`. T (--pack-length) defaults to the multiple of --bucket,
from the longest tree up, whose rows hold the batch in the fewest positions (as the trainer
chooses it from the data, kto_jax/data/shapes.py); the examples are spread over the
microbatches with even tokens, as the pipeline plans them (`batching.balance_microbatches`).

Token counts of one step (`TokenCount`), per model pass (the reference forward, when it runs,
computes the same positions again):
  real_tokens         sum of len(x) + len(y) over the examples: no padding, no KL copies, no
                      second copy of a prompt;
  placed_tokens       positions holding a token (real tokens plus the copies the layout
                      computes: y_kl, and x again unless shared);
  computed_positions  rows x row length the step computes (packed_shared with z0: R x (T + Tk)
                      per microbatch, main and kl rows);
  token_efficiency = real_tokens / computed_positions (the issue's definition); it is at most
  sum(x + y) / sum(x + y + y_kl) for packed_shared with z0 (1 without z0) and half that for
  the other two layouts;
  fill = placed_tokens / computed_positions: the share of positions that are not padding.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import json
import math
import os
from typing import Sequence

import numpy as np

from kto_jax.batch import as_batch, batch_shapes
from kto_jax.data import batching, packing, shapes
from kto_jax.errors import UserError

# --lengths NAME -> file under kto_jax/perf/data/ (scripts/length_histogram.py made it)
NAMED = {"hh-rlhf": "hh_rlhf_harmless_base.json"}
LAYOUTS = ("padded", "packed", "packed_shared")
PAD_ID = 0
FIRST_TOKEN_ID = 3   # random token ids are >= this (as the fixed workload)


@dataclasses.dataclass(frozen=True)
class LengthDistribution:
    """(prompt_len, completion_len) samples or histogram bins with their counts.

    Attributes:
      source: the name or file it came from (reported in the JSON line).
      prompt, completion: int [K]: exact lengths (width 1) or the bins' lower edges.
      count: float [K] > 0: how often each row or bin occurs.
      width: 1 for samples, the bin width for a histogram.
    """
    source: str
    prompt: np.ndarray
    completion: np.ndarray
    count: np.ndarray
    width: int = 1

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n (prompt_len, completion_len) pairs: a row by its count, then uniform in its bin."""
        k = rng.choice(len(self.count), size=n, p=self.count / self.count.sum())
        jitter = rng.integers(0, self.width, size=(2, n))
        return (np.maximum(self.prompt[k] + jitter[0], 1).astype(np.int64),
                np.maximum(self.completion[k] + jitter[1], 1).astype(np.int64))


def load_lengths(spec: str) -> LengthDistribution:
    """The distribution named `spec` (`NAMED`) or read from the file `spec` (module docstring).

    Raises:
      UserError: an unknown name that is no file, an unknown extension, or a file whose
        rows are not positive integer lengths (naming the file, the row and the fix).
    """
    if spec in NAMED:
        ref = importlib.resources.files("kto_jax.perf") / "data" / NAMED[spec]
        with importlib.resources.as_file(ref) as path:
            return _read_histogram(str(path), spec)
    if not os.path.isfile(spec):
        raise UserError(f"--lengths {spec!r}: neither a named distribution "
                        f"({', '.join(NAMED)}) nor a file")
    ext = os.path.splitext(spec)[1].lower()
    if ext == ".json":
        return _read_histogram(spec, spec)
    if ext in (".jsonl", ".csv"):
        return _read_rows(spec, ext)
    raise UserError(f"--lengths {spec}: a lengths file must be .csv (header prompt_len,"
                    "completion_len[,count]), .jsonl ({\"prompt_len\": P, \"completion_len\": C} "
                    "per line) or a .json histogram")


_ROW_HELP = ("each row needs integer prompt_len >= 1 and completion_len >= 1 "
             "(and optionally count > 0)")


def _read_rows(path: str, ext: str) -> LengthDistribution:
    rows: list[tuple[str, dict]] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if ext == ".csv":
                reader = csv.DictReader(f)
                if not {"prompt_len", "completion_len"} <= set(reader.fieldnames or ()):
                    raise UserError(f"--lengths {path}: the CSV header must name prompt_len and "
                                    f"completion_len (optionally count); got {reader.fieldnames}")
                rows = [(f"row {i + 2}", r) for i, r in enumerate(reader)]
            else:
                for i, line in enumerate(f):
                    if line.strip():
                        obj = json.loads(line)
                        if not isinstance(obj, dict):
                            raise UserError(f"--lengths {path}: line {i + 1} is not a JSON "
                                            f"object; {_ROW_HELP}")
                        rows.append((f"line {i + 1}", obj))
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"--lengths {path}: not readable as {ext[1:].upper()} ({err}); "
                        f"{_ROW_HELP}") from err
    if not rows:
        raise UserError(f"--lengths {path}: no rows; {_ROW_HELP}")
    values = np.array([[_positive_int(path, where, r, key, key == "count")
                        for key in ("prompt_len", "completion_len", "count")]
                       for where, r in rows], np.float64)
    return LengthDistribution(path, values[:, 0].astype(np.int64), values[:, 1].astype(np.int64),
                              values[:, 2])


def _positive_int(path: str, where: str, row: dict, key: str, optional: bool) -> float:
    value = row.get(key)
    if value in (None, "") and optional:
        return 1.0
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    ok = number > 0 if key == "count" else number >= 1 and number.is_integer()
    if isinstance(value, bool) or not (ok and math.isfinite(number)):
        raise UserError(f"--lengths {path}: {where} has {key}={value!r}; {_ROW_HELP}")
    return number


def _read_histogram(path: str, source: str) -> LengthDistribution:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        width = int(doc["bin_width"])
        bins = np.asarray(doc["bins"], np.float64).reshape(-1, 3)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--lengths {path}: not a lengths histogram ({err!r}); a .json file "
                        "needs {\"bin_width\": W, \"bins\": [[prompt_low, completion_low, "
                        "count], ...]}") from err
    if width < 1 or not len(bins) or (bins[:, :2] < 0).any() or (bins[:, 2] <= 0).any():
        raise UserError(f"--lengths {path}: bin_width must be >= 1, lower edges >= 0 and "
                        "counts > 0, with at least one bin")
    return LengthDistribution(source, bins[:, 0].astype(np.int64), bins[:, 1].astype(np.int64),
                              bins[:, 2], width)


# ---------------------------------------------------------------- examples

@dataclasses.dataclass(frozen=True)
class Examples:
    """One global batch of A x M examples in slot order (example k: microbatch k // M)."""
    prompts: list[np.ndarray]
    completions: list[np.ndarray]
    accum: int
    micro_batch: int
    truncated: int = 0   # examples whose prompt or completion was cut to the caps

    def microbatch(self, a: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        m = self.micro_batch
        return self.prompts[a * m:(a + 1) * m], self.completions[a * m:(a + 1) * m]

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.prompts], np.int64)

    @property
    def completion_lengths(self) -> np.ndarray:
        return np.array([len(y) for y in self.completions], np.int64)


def make_examples(prompt_lengths: Sequence[int], completion_lengths: Sequence[int], *,
                  accum: int, micro_batch: int, vocab_size: int, seed: int,
                  truncated: int = 0) -> Examples:
    """Examples of the given lengths with random token ids in [FIRST_TOKEN_ID, vocab_size)."""
    rng = np.random.default_rng(seed)
    draw = lambda n: rng.integers(FIRST_TOKEN_ID, vocab_size, int(n)).astype(np.int32)
    return Examples([draw(n) for n in prompt_lengths], [draw(n) for n in completion_lengths],
                    accum, micro_batch, truncated)


def sample_examples(dist: LengthDistribution, *, accum: int, micro_batch: int, max_prompt: int,
                    max_completion: int, vocab_size: int, seed: int) -> Examples:
    """A x M examples with lengths drawn from `dist`, truncated to the caps, spread over the
    microbatches as the data pipeline spreads a global batch (even tokens per microbatch)."""
    rng = np.random.default_rng(seed)
    p, c = dist.sample(accum * micro_batch, rng)
    truncated = int(((p > max_prompt) | (c > max_completion)).sum())
    p, c = np.minimum(p, max_prompt), np.minimum(c, max_completion)
    # the microbatches of even tokens the data pipeline plans (batching.balance_microbatches)
    order = batching.balance_microbatches(np.arange(len(p)), p + 2 * c, micro_batch)
    p, c = p[order], c[order]
    return make_examples(p, c, accum=accum,
                         micro_batch=micro_batch, vocab_size=vocab_size, seed=seed + 1,
                         truncated=truncated)


# ---------------------------------------------------------------- layouts

@dataclasses.dataclass(frozen=True)
class TokenCount:
    """What one step computes per model pass (module docstring)."""
    layout: str
    real_tokens: int
    placed_tokens: int
    rows: int           # rows per microbatch
    row_length: int     # positions per row (P + C padded, or T packed)
    accum: int
    kl_row_length: int = 0   # Tk of the kl row beside each row (packed_shared with z0), else 0

    @property
    def computed_positions(self) -> int:
        return self.accum * self.rows * (self.row_length + self.kl_row_length)

    @property
    def token_efficiency(self) -> float:
        return self.real_tokens / self.computed_positions

    @property
    def fill(self) -> float:
        return self.placed_tokens / self.computed_positions

    @property
    def token_efficiency_ceiling(self) -> float:
        """token_efficiency with no padding at all: the layout's copies (y_kl, a second x) remain."""
        return self.real_tokens / self.placed_tokens


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // int(multiple)) * int(multiple)


def _labels(accum: int, micro_batch: int) -> dict[str, np.ndarray]:
    """desirable (alternating, balanced as TRL's anchor), weight 1, every row valid."""
    desirable = (np.arange(accum * micro_batch) % 2 == 0).reshape(accum, micro_batch)
    return {"desirable": desirable, "weight": np.ones((accum, micro_batch), np.float32),
            "valid": np.ones((accum, micro_batch), bool)}


def padded_batch(ex: Examples, bucket: int, uses_kl: bool = True
                 ) -> tuple[dict[str, np.ndarray], TokenCount]:
    """The batch [A, M, ...] of kto_jax/batch.py: prompts left-padded, completions right-padded,
    to the batch's longest rounded up to `bucket`; the step runs (x, y_kl) rows too when the
    loss reads the KL completions (`uses_kl`)."""
    lp, lc = ex.prompt_lengths, ex.completion_lengths
    p, c = round_up(lp.max(), bucket), round_up(lc.max(), bucket)
    shapes = batch_shapes(False, accumulation=ex.accum, micro_batch=ex.micro_batch,
                          prompt_len=p, completion_len=c)
    arrays = {k: np.full(shapes[k][0], PAD_ID, shapes[k][1]) for k in ("prompt_ids", "completion_ids")}
    arrays.update({k: np.zeros(*shapes[k]) for k in ("prompt_mask", "completion_mask")})
    for k, (x, y) in enumerate(zip(ex.prompts, ex.completions)):
        a, i = divmod(k, ex.micro_batch)
        arrays["prompt_ids"][a, i, p - len(x):] = x
        arrays["prompt_mask"][a, i, p - len(x):] = 1
        arrays["completion_ids"][a, i, :len(y)] = y
        arrays["completion_mask"][a, i, :len(y)] = 1
    real = int(lp.sum() + lc.sum())
    # (x, y) and (x, y_kl) rows: every prompt and completion twice (y_kl is a roll of y)
    copies = 2 if uses_kl else 1
    count = TokenCount("padded", real, copies * real, copies * ex.micro_batch, p + c, ex.accum)
    return as_batch(dict(arrays, **_labels(ex.accum, ex.micro_batch)), paired=False), count


def _trees(prompts, completions, shared: bool, groups: int, uses_kl: bool = True):
    """(prompts, firsts, seconds, slots) for pack_batch: slots[i] = (tree of y_i, tree of y_kl_i).

    shared: example i is x_i, y_i and its KL completion y_kl_i (`packing.kl_completions`, as
    the pipeline pairs them), or no second completion when not `uses_kl` (the trainer's
    layout). Otherwise example i gives two trees, [x_i | y_i | -] and [x_i | - | y_kl_i], both
    in example i's packing group (the examples of group g, then their KL trees, so group g's
    trees are block g of the list).
    """
    kl = packing.kl_completions(completions)
    m = len(prompts)
    if shared:
        seconds = kl if uses_kl else [np.zeros(0, np.int32)] * m
        return prompts, completions, seconds, [(i, i) for i in range(m)]
    empty = np.zeros(0, np.int32)
    size = m // groups
    xs, firsts, seconds, slots = [], [], [], [None] * m
    for g in range(groups):
        block = range(g * size, (g + 1) * size)
        base = len(xs)
        xs += [prompts[i] for i in block] * 2
        firsts += [completions[i] for i in block] + [empty] * size
        seconds += [empty] * size + [kl[i] for i in block]
        for j, i in enumerate(block):
            slots[i] = (base + j, base + size + j)
    return xs, firsts, seconds, slots


def packed_batch(ex: Examples, *, shared: bool, pack_length: int, groups: int, bucket: int,
                 uses_kl: bool = True) -> tuple[dict[str, np.ndarray], TokenCount]:
    """The examples as the packed batch of kto_jax/batch.py: rows [A, R, T], per-example
    gathers [A, M, C], labels [A, M]; R is the most rows any microbatch needs.

    Args:
      shared: the trainer's layout for the loss (packed_shared: with `uses_kl` main rows
        [x | y] beside kl rows of y_kl, else rows of [x | y]), or [x | y] and [x | y_kl]
        segments (packed).
      pack_length: T; 0 picks it (`shapes.best_row_length`, multiples of `bucket`).
      groups: packing groups per microbatch (batch shards); divides M.
      uses_kl: the benchmarked loss reads the KL completions (loss.uses_kl).
    """
    micro = [_trees(*ex.microbatch(a), shared, groups, uses_kl) for a in range(ex.accum)]
    lengths = [np.array([[len(s) for s in t[k]] for t in micro], np.int64) for k in range(3)]
    placed = lengths[0] + lengths[1] + lengths[2]          # [A, M] tokens placed per tree
    kl_share = 0.0
    if shared and uses_kl:    # the kl stream, as kto_jax/data/shapes.py and batching.py size it
        kl_share = packing.kl_share_for(lengths[0] + lengths[1], lengths[2])
        tree_lengths = packing.stream_lengths(lengths[0] + lengths[1], lengths[2], kl_share)
    else:
        tree_lengths = placed
    longest = int(tree_lengths.max())
    t_len = pack_length or shapes.best_row_length(tree_lengths, longest, bucket, groups)
    if longest > t_len:
        what = ("[x | y] beside y_kl" if kl_share else "[x | y | y_kl]" if shared and uses_kl
                else "[x | y]")
        raise UserError(f"--pack-length {t_len} cannot hold the longest {what} example "
                        f"({longest} tokens): raise --pack-length or lower --prompt-len / "
                        "--completion-len")
    rows = packing.microbatch_rows(tree_lengths, t_len, groups)
    packed = packing.pack_batch(*([t[k] for t in micro] for k in range(3)),
                                names=packing.UNPAIRED_NAMES, pack_length=t_len, num_rows=rows,
                                completion_length=round_up(ex.completion_lengths.max(), bucket),
                                pad_id=PAD_ID, groups=groups, kl_share=kl_share)
    slots = np.array([t[3] for t in micro])              # [A, M, 2]: trees of y_i and y_kl_i
    a = np.arange(ex.accum)[:, None]
    batch = {k: v for k, v in packed.items() if k in packing.ROW_KEYS + packing.KL_ROW_KEYS}
    for name, pick in zip(packing.UNPAIRED_NAMES, (slots[..., 0], slots[..., 1])):
        batch.update({f"{name}_{k}": packed[f"{name}_{k}"][a, pick] for k in ("ids", "mask", "index")})
    batch["prompt_length"] = packed["prompt_length"][a, slots[..., 0]]
    batch.update(_labels(ex.accum, ex.micro_batch))
    real = int(ex.prompt_lengths.sum() + ex.completion_lengths.sum())
    kl_row = packing.kl_row_length(t_len, kl_share) if kl_share else 0
    count = TokenCount("packed_shared" if shared else "packed", real, int(placed.sum()),
                       rows, t_len, ex.accum, kl_row)
    return as_batch(batch, paired=False), count


def layout_batch(ex: Examples, layout: str, *, bucket: int, pack_length: int = 0, groups: int = 1,
                 uses_kl: bool = True) -> tuple[dict[str, np.ndarray], TokenCount]:
    """The examples in `layout` (LAYOUTS) for a loss that reads the KL completions or not
    (`uses_kl`, loss.uses_kl): the step's batch and its token count."""
    if layout == "padded":
        return padded_batch(ex, bucket, uses_kl)
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    return packed_batch(ex, shared=layout == "packed_shared", pack_length=pack_length,
                        groups=groups, bucket=bucket, uses_kl=uses_kl)
