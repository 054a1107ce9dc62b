"""`build_datasets`: data settings + tokenizer -> train iterator factory, eval batches, summary.

Preparation (once, at start-up; a `kto-jax data prepare` directory skips to the
gathered statistics, kto_jax/data/prepared.py):
  read rows (every process reads and normalises the whole file: JSONL/JSON have no
  random access) -> detect the format -> split off eval rows (seeded) -> validate
  and normalise -> (train) keep data.*_fraction of each class -> phase 1 of
  kto_jax/data/shards.py: this process tokenizes its 1/n slice of the examples
  (truncation, overlong / template-mismatch drops) and the per-example statistics
  are all-gathered -> summary and λ advice.
The gathered statistics are the same on every process, so all agree on n_D and
n_U (hence eq. 9's λ), on what was dropped, on the errors, and on each global
batch's members and padded shape, while each tokenized only 1/n of the data.

Batches (a grain pipeline of small named transforms, per global batch index):
  MapDataset.range -> PlanBatch (global shuffle per epoch, optional length
  grouping, batch cut, bucket shape) -> ShardRows (this process's rows of each
  microbatch) -> TokenizeRows (phase 2: their tokens, from the start-up cache or
  tokenized now) -> PadRows (static arrays) -> to_iter_dataset (thread prefetch)
  -> mp_prefetch (data.worker_count processes).
A batch is a pure function of its global index, so the iterator state is just
the index of the next batch (plus a fingerprint of the data that refuses a
resume onto different data or batching).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Iterator, NamedTuple

import numpy as np

from kto_jax.data import (batching, formats, imbalance, packing, prepared, shapes, shards,
                          tokenize)
from kto_jax.data.iterator import (EVAL_STREAM, TRAIN_STREAM, EpochPlans, EvalBatches,
                                   FeedbackIterator, TrainFactory)
from kto_jax.data.readers import RowSet, read_rows
from kto_jax.data.summary import DataSummary, SplitSummary, length_percentiles
from kto_jax.data.settings import DataSettings
from kto_jax.errors import UserError

_HASH_CHUNK = 1 << 16   # examples per update of the data fingerprint


class Datasets(NamedTuple):
    """What `build_datasets` returns (unpack it as a 3-tuple).

    train_iter_factory(num_epochs=None, *, forever=False) -> FeedbackIterator:
        a fresh iterator over this process's training batches from the first
        batch, for num_epochs (default data.num_epochs) or forever.
        Restore a position with `it.set_state(saved)`.
    eval_batches() -> iterator over this process's eval batches (one pass, the
        same batches every call), or None when there is no eval split.
    summary: a `DataSummary`.
    """
    train_iter_factory: Callable[..., FeedbackIterator]
    eval_batches: Callable[[], Iterator[dict]] | None
    summary: DataSummary


def build_datasets(data: DataSettings, tokenizer, *, process_index: int | None = None,
                   process_count: int | None = None,
                   allgather: shards.AllGather | None = None) -> Datasets:
    """Reads, validates, tokenizes and plans the data of a run.

    Args:
      data: the run's `DataSettings` (config.data, the batch sizes, the loss's needs;
        kto_jax/train/settings.py reads them from the config).
      tokenizer: a Hugging Face tokenizer (chat template needed for conversational data).
      process_index, process_count: default jax.process_index() / jax.process_count().
      allgather: gathers each process's statistics rows, [R, K] -> [process_count, R, K]
        in process order; default `multihost_utils.process_allgather` (tests
        substitute an in-process one). Unused with one process.

    Returns:
      `Datasets(train_iter_factory, eval_batches, summary)`. Batches are dicts of
      numpy arrays shaped [A, M / process_count, ...] as kto_jax/batch.py describes.

    Raises:
      UserError: any bad input (files, formats, fields, config values), or a split
        left empty by filtering.
    """
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel
        process_index, process_count = jax.process_index(), jax.process_count()
    d, paired = data, data.paired
    check_config(d, process_count)
    layout = batch_layout(d, tokenizer, process_index, process_count)
    if prepared.is_prepared(d.train_path):   # `kto-jax data prepare` output: reads only our rows
        fmt, conversational, splits, eval_note = prepared.open_splits(d, tokenizer)
    else:
        fmt, conversational, splits, eval_note = read_splits(d, tokenizer, layout, allgather)
    layout, chosen = shapes.choose(d, layout, splits["train"].split,
                                   splits["eval"].split if "eval" in splits else None,
                                   multiple=d.shape_multiple or _backend_multiple())
    plans = {name: _epoch_plans(split, layout, d.seed) for name, split in splits.items()}
    summaries = {name: _split_summary(split, plans[name]) for name, split in splits.items()}
    train, evaluation = splits["train"].split, splits.get("eval")
    summary = _summarize(d, fmt, conversational, summaries["train"], summaries.get("eval"),
                         eval_note, layout, _fingerprint(d, train, layout))
    summary.shapes_line = chosen.line() if chosen is not None else ""
    return Datasets(TrainFactory(train, plans["train"], d, summary.fingerprint),
                    None if evaluation is None else EvalBatches(evaluation.split, plans["eval"], d),
                    summary)


def _backend_multiple() -> int:
    import jax  # pylint: disable=import-outside-toplevel
    return shapes.backend_multiple(jax.default_backend())


TokenizeSplit = Callable[[str, formats.Examples, tokenize.TokenSpec],
                         tuple[object, tokenize.TokenReport]]


def read_splits(d: DataSettings, tokenizer, layout: batching.BatchLayout,
                allgather: shards.AllGather | None = None,
                tokenize_split: TokenizeSplit | None = None
                ) -> tuple[str, bool, dict[str, shards.SplitData], str]:
    """Reads, validates and tokenizes (this process's share of) the data files.

    `tokenize_split(name, examples, spec) -> (split, report)` tokenizes one split's
    examples; default: `shards.tokenize_sharded` (this process's slice, all-gathered
    statistics). `kto-jax data prepare` passes one that writes the tokens as it goes.

    Returns:
      (format, conversational, {"train": ..., "eval": ... (if any)}, eval note).
    """
    if tokenize_split is None:
        def sharded(name, examples, spec):  # pylint: disable=unused-argument
            return shards.tokenize_sharded(
                examples, spec, process_index=layout.process_index,
                process_count=layout.process_count, allgather=allgather,
                on_overlong=d.on_overlong, on_prefix_mismatch=d.on_prefix_mismatch)
        tokenize_split = sharded
    train_rows = read_rows(d.train_path, split=d.train_split, config_key="data.train_path")
    fmt, conversational = formats.detect_format(train_rows, d.format)
    train_rows, eval_rows, eval_note = _split_rows(train_rows, d)
    splits = {"train": _prepare_split("train", train_rows, train_rows.source, fmt,
                                      conversational, d, tokenizer, layout, tokenize_split)}
    if eval_rows is not None:
        eval_fmt, eval_conv = formats.detect_format(eval_rows, fmt)
        if eval_conv != conversational:
            raise UserError(f"{eval_rows.source}: eval rows are "
                            f"{'conversational' if eval_conv else 'text'} but the train rows of "
                            f"{train_rows.source} are not.")
        splits["eval"] = _prepare_split("eval", eval_rows, eval_note, eval_fmt, eval_conv, d,
                                        tokenizer, layout, tokenize_split)
    return fmt, conversational, splits, eval_note


def check_config(d: DataSettings, process_count: int) -> None:
    """UserError naming every problem of the data settings (and of the batch sizes, whose
    rules are `BatchSize.problems`) for `process_count` processes."""
    problems = []
    if not 0 < d.max_prompt_length < d.max_length:
        problems.append(f"need 0 < data.max_prompt_length ({d.max_prompt_length}) < "
                        f"data.max_length ({d.max_length})")
    if not 0 <= d.max_completion_length <= d.max_length:
        problems.append(f"data.max_completion_length={d.max_completion_length} must be 0 (off) "
                        f"or at most data.max_length={d.max_length}")
    for key in ("on_overlong", "on_prefix_mismatch"):
        if getattr(d, key) not in ("drop", "error"):
            problems.append(f"data.{key}={getattr(d, key)!r} must be \"drop\" or \"error\"")
    for key in ("desirable_fraction", "undesirable_fraction"):
        if not 0.0 <= getattr(d, key) <= 1.0:
            problems.append(f"data.{key}={getattr(d, key)} must lie in [0, 1]")
    if not 0.0 <= d.eval_fraction < 1.0:
        problems.append(f"data.eval_fraction={d.eval_fraction} must lie in [0, 1)")
    if d.bucket_window < 1 or d.worker_count < 0 or d.prefetch < 0 or d.num_epochs < 1:
        problems.append("data.bucket_window and data.num_epochs must be >= 1, data.worker_count "
                        "and data.prefetch >= 0")
    problems.extend(d.batch.problems(process_count=process_count))
    if d.paired and (d.one_y_per_x or d.desirable_fraction < 1 or d.undesirable_fraction < 1):
        problems.append(f"loss.name={d.loss_name} trains on pairs: data.one_y_per_x and "
                        "data.*_fraction apply to unpaired losses only")
    problems.extend(packing.config_problems(d))
    if problems:
        raise UserError("invalid data config: " + "; ".join(problems) + ".")


def _split_rows(rows: RowSet, d: DataSettings) -> tuple[RowSet, RowSet | None, str]:
    """Train rows, eval rows (separate file or a seeded share of train) and a note."""
    if d.eval_path:
        return rows, read_rows(d.eval_path, split=d.eval_split,
                               config_key="data.eval_path"), d.eval_path
    n = len(rows.records)
    n_eval = int(round(n * d.eval_fraction))
    if n_eval == 0:
        return rows, None, (f"none (data.eval_fraction={d.eval_fraction} of {n} rows and no "
                            "data.eval_path)")
    if n_eval >= n:
        raise UserError(f"data.eval_fraction={d.eval_fraction} leaves no training rows out of {n}.")
    perm = np.random.default_rng([d.seed, 0]).permutation(n)
    note = f"{n_eval} rows held out of {rows.source} (data.eval_fraction={d.eval_fraction}, seed {d.seed})"
    return rows.subset(np.sort(perm[n_eval:])), rows.subset(np.sort(perm[:n_eval])), note


def batch_layout(d: DataSettings, tokenizer, process_index: int, process_count: int
                 ) -> batching.BatchLayout:
    """The batches' shapes; with data.packing, packed in `d.pack_groups` groups of rows (the
    batch shards of the run's mesh, as the step's)."""
    packed = dict(pack_second=d.pack_second)
    if d.packing:
        d.batch.check(process_count=process_count, pack_groups=d.pack_groups)
        packed.update(pack_length=int(d.pack_length), pack_groups=int(d.pack_groups))
    max_completion = d.max_completion_length or d.max_length
    prompt_buckets, completion_buckets = batching.bucket_sizes(
        d.bucket_lengths, d.max_prompt_length, max_completion)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return batching.BatchLayout(
        accumulation=d.batch.accumulation, micro_batch=d.batch.micro_batch,
        process_index=process_index, process_count=process_count,
        prompt_buckets=prompt_buckets, completion_buckets=completion_buckets, pad_id=int(pad_id),
        window=d.bucket_window, drop_remainder=d.drop_remainder, **packed)


def _prepare_split(name, rows, source, fmt, conversational, d: DataSettings, tokenizer, layout,
                   tokenize_split):
    """Rows -> `SplitData` (fractions on train only)."""
    paired = d.paired
    no_signal: list[tuple[str, str, int]] = []   # (reason, where, examples): rows that teach nothing
    if fmt == "paired":
        items = formats.normalise_pairs(rows, conversational,
                                        empty_completions=d.empty_completions)
        # an identical pair is one example for a paired loss, and its two sides for an
        # unpaired one (one of them under one_y_per_x)
        sides = 1 if paired or (d.one_y_per_x and name == "train") else 2
        no_signal = [(formats.NO_PREFERENCE, p.where, sides) for p in items
                     if p.chosen == p.rejected]
        items = [p for p in items if p.chosen != p.rejected]
        if not paired:
            items = formats.unpair(items, one_y_per_x=d.one_y_per_x and name == "train",
                                   seed=d.seed)
    elif paired:
        raise UserError(f"loss.name={d.loss_name} needs paired data (prompt, chosen, "
                        f"rejected), but {rows.source} is {fmt}; use an unpaired loss such as kto.")
    else:
        items = formats.normalise_unpaired(rows, fmt, conversational,
                                           score_threshold=d.score_threshold,
                                           score_weighting=d.score_weighting,
                                           empty_completions=d.empty_completions)
        no_signal = [(formats.ZERO_WEIGHT, e.where, 1) for e in items if e.weight == 0]
        items = [e for e in items if e.weight != 0]
    examples = formats.Examples.of(items)   # the desirable column is built here, once
    n_examples, subsampled = len(examples) + sum(n for _, _, n in no_signal), {}
    if name == "train" and not paired:
        desirable = examples.desirable
        keep = imbalance.subsample_classes(desirable, d.desirable_fraction, d.undesirable_fraction,
                                           d.seed)
        kept = desirable[keep]
        subsampled = {"desirable": int(desirable.sum() - kept.sum()),
                      "undesirable": int((~desirable).sum() - (~kept).sum())}
        examples = examples.subset(keep)
    spec = tokenize.TokenSpec(tokenizer, conversational, d.max_length, d.max_prompt_length,
                              d.max_completion_length)
    split, report = tokenize_split(name, examples, spec)
    for reason, where, count in no_signal:
        report.drop(reason, where, count)
    if len(split) == 0:
        raise UserError(f"{rows.source}: " + _empty_message(name, len(rows.records), n_examples,
                                                            subsampled, report))
    if name == "train" and d.drop_remainder and len(split) < layout.global_batch:
        raise UserError(f"{rows.source}: only {len(split)} training examples, fewer than one global batch of "
                        f"{layout.global_batch}, and data.drop_remainder=True drops them all; "
                        "set data.drop_remainder=False or lower train.global_batch_size.")
    return shards.SplitData(name, split, source, len(rows.records), n_examples, subsampled, report)


def _empty_message(name, rows, examples, subsampled, report) -> str:
    reasons = [f"{n} {cls} removed by data.{cls}_fraction" for cls, n in subsampled.items() if n]
    reasons += [f"{n} dropped: {reason}" for reason, n in report.dropped_count.items()]
    return (f"the {name} split is empty after filtering: {rows} rows -> {examples} examples; "
            f"{'; '.join(reasons) or 'nothing survived'}. Check data.max_length, "
            "data.*_fraction and the chat template.")


def _epoch_plans(data: shards.SplitData, layout, seed) -> EpochPlans:
    """The split's plans: train with the run's layout, eval always padded (no drop)."""
    if data.name == "train":
        return EpochPlans(data.split, layout, seed, TRAIN_STREAM)
    return EpochPlans(data.split, dataclasses.replace(layout, drop_remainder=False), seed,
                      EVAL_STREAM)


def _split_summary(data: shards.SplitData, plans: EpochPlans) -> SplitSummary:
    name, split = data.name, data.split
    plan = plans(0)
    totals = split.total_lengths
    n_desirable = 0 if split.paired else int(split.desirable.sum())
    return SplitSummary(
        name=name, source=data.source, rows=data.rows, examples=data.examples,
        subsampled=data.subsampled, tokens=data.report, kept=len(split), n_desirable=n_desirable,
        n_undesirable=0 if split.paired else len(split) - n_desirable, paired=split.paired,
        lengths=length_percentiles(split.prompt_lengths, plans.completion_lengths, totals),
        batches_per_epoch=len(plan), plan=batching.plan_stats(split, plan, plans.layout))


def _summarize(d: DataSettings, fmt, conversational, train, evaluation, eval_note, layout,
               fingerprint) -> DataSummary:
    paired = d.paired
    lam_d, lam_u = d.desirable_weight, d.undesirable_weight
    n_d, n_u = train.n_desirable, train.n_undesirable
    recommended = None if paired else imbalance.balanced_weights(n_d, n_u)
    warnings = []
    uses_lambda = not paired and d.uses_lambda_weights  # eq. 8's λ
    auto = bool(uses_lambda and d.auto_weights and recommended is not None)
    if auto:  # only a loss that weighs its classes gets eq. 9's weights (and says so)
        lam_d, lam_u = recommended
    if uses_lambda:
        warning = imbalance.ratio_warning(lam_d, lam_u, n_d, n_u, d.offer_auto_weights)
        if warning:
            warnings.append(warning)
    elif d.auto_weights:
        warnings.append(f"loss.auto_weights has no effect on loss {d.loss_name}, which does "
                        "not use lambda_D / lambda_U.")
    return DataSummary(
        format=fmt, conversational=conversational, paired=paired, loss=d.loss_name,
        train=train, eval=evaluation, eval_note=eval_note, desirable_weight=float(lam_d),
        undesirable_weight=float(lam_u), recommended_weights=recommended,
        uses_lambda_weights=uses_lambda, auto_weights_applied=auto,
        weight_ratio=None if paired else imbalance.weight_ratio(lam_d, lam_u, n_d, n_u),
        batch_shape=(layout.accumulation, layout.micro_batch, layout.local_micro_batch),
        fingerprint=fingerprint, warnings=warnings)


def _fingerprint(d: DataSettings, split: shards.ShardedSplit, layout: batching.BatchLayout) -> str:
    """Hash of everything a batch depends on, except which process reads it.

    The tokens enter through each example's gathered CRC and lengths, so every
    process computes the same value without holding every example's tokens.
    """
    h = hashlib.sha256()
    for column in (split.prompt_lengths, *split.side_lengths, split.token_hash, split.desirable,
                   split.weight):
        # In chunks (the digest of the concatenation): no int64 copy of a whole column, and a
        # prepared split's token_hash (`prepared.NpyColumn`) is streamed from its file.
        chunks = (column.chunks(_HASH_CHUNK) if hasattr(column, "chunks") else
                  (column[i:i + _HASH_CHUNK] for i in range(0, len(column), _HASH_CHUNK)))
        for chunk in chunks:
            h.update(np.ascontiguousarray(chunk, np.int64 if chunk.dtype.kind in "iu" else None
                                          ).tobytes())
    shape = dataclasses.replace(layout, process_index=0, process_count=1)
    h.update(repr((shape, d.seed)).encode())
    if layout.pack_length:  # packed batches differ from padded ones (fields kept out of repr)
        h.update(repr(("packed", layout.pack_length, layout.pack_groups)).encode())
        if layout.pack_shapes:   # the row shapes change the batches
            h.update(repr(("shapes", layout.pack_shapes)).encode())
        if layout.kl_share:      # so does the kl stream
            h.update(repr(("kl_share", layout.kl_share)).encode())
    return h.hexdigest()[:16]
