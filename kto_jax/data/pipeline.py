"""`build_datasets`: config + tokenizer -> train iterator factory, eval batches, summary.

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

from kto_jax.data import batching, formats, imbalance, packing, prepared, shards, tokenize
from kto_jax.data.iterator import (EVAL_STREAM, TRAIN_STREAM, EpochPlans, EvalBatches,
                                   FeedbackIterator, TrainFactory)
from kto_jax.data.readers import RowSet, read_rows
from kto_jax.data.summary import DataSummary, SplitSummary, length_percentiles
from kto_jax.errors import UserError
from kto_jax.losses.registry import get_loss
from kto_jax.sharding import configured_batch_shards

_HASH_CHUNK = 1 << 16   # examples per update of the data fingerprint


class Datasets(NamedTuple):
    """What `build_datasets` returns (unpack it as a 3-tuple).

    train_iter_factory(num_epochs=None, *, forever=False) -> FeedbackIterator:
        a fresh iterator over this process's training batches from the first
        batch, for num_epochs (default config.data.num_epochs) or forever.
        Restore a position with `it.set_state(saved)`.
    eval_batches() -> iterator over this process's eval batches (one pass, the
        same batches every call), or None when there is no eval split.
    summary: a `DataSummary`.
    """
    train_iter_factory: Callable[..., FeedbackIterator]
    eval_batches: Callable[[], Iterator[dict]] | None
    summary: DataSummary


def build_datasets(config, tokenizer, *, process_index: int | None = None,
                   process_count: int | None = None,
                   allgather: shards.AllGather | None = None) -> Datasets:
    """Reads, validates, tokenizes and plans the data of a run.

    Args:
      config: the run's ConfigDict (uses config.data, config.train.global_batch_size,
        config.train.micro_batch_size, config.loss).
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
    d, paired = config.data, get_loss(config.loss.name).paired
    check_config(config, paired, process_count)
    layout = batch_layout(config, tokenizer, process_index, process_count)
    if prepared.is_prepared(d.train_path):   # `kto-jax data prepare` output: reads only our rows
        fmt, conversational, splits, eval_note = prepared.open_splits(config, tokenizer, paired)
    else:
        fmt, conversational, splits, eval_note = read_splits(config, tokenizer, layout, paired,
                                                             allgather)
    plans = {name: _epoch_plans(data, layout, d.seed) for name, data in splits.items()}
    summaries = {name: _split_summary(data, plans[name]) for name, data in splits.items()}
    train, evaluation = splits["train"].split, splits.get("eval")
    summary = _summarize(config, fmt, conversational, paired, summaries["train"],
                         summaries.get("eval"), eval_note, layout,
                         _fingerprint(config, train, layout))
    return Datasets(TrainFactory(train, plans["train"], d, summary.fingerprint),
                    None if evaluation is None else EvalBatches(evaluation.split, plans["eval"], d),
                    summary)


TokenizeSplit = Callable[[str, formats.Examples, tokenize.TokenSpec],
                         tuple[object, tokenize.TokenReport]]


def read_splits(config, tokenizer, layout: batching.BatchLayout, paired: bool,
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
    d = config.data
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
                                      conversational, config, paired, tokenizer, layout,
                                      tokenize_split)}
    if eval_rows is not None:
        eval_fmt, eval_conv = formats.detect_format(eval_rows, fmt)
        if eval_conv != conversational:
            raise UserError(f"{eval_rows.source}: eval rows are "
                            f"{'conversational' if eval_conv else 'text'} but the train rows of "
                            f"{train_rows.source} are not.")
        splits["eval"] = _prepare_split("eval", eval_rows, eval_note, eval_fmt, eval_conv, config,
                                        paired, tokenizer, layout, tokenize_split)
    return fmt, conversational, splits, eval_note


def check_config(config, paired: bool, process_count: int) -> None:
    d, t = config.data, config.train
    problems = []
    if not 0 < d.max_prompt_length < d.max_length:
        problems.append(f"need 0 < data.max_prompt_length ({d.max_prompt_length}) < "
                        f"data.max_length ({d.max_length})")
    if not 0 <= d.max_completion_length <= d.max_length:
        problems.append(f"data.max_completion_length={d.max_completion_length} must be 0 (off) "
                        f"or at most data.max_length={d.max_length}")
    for key in ("on_overlong", "on_prefix_mismatch"):
        if d[key] not in ("drop", "error"):
            problems.append(f"data.{key}={d[key]!r} must be \"drop\" or \"error\"")
    for key in ("desirable_fraction", "undesirable_fraction"):
        if not 0.0 <= d[key] <= 1.0:
            problems.append(f"data.{key}={d[key]} must lie in [0, 1]")
    if not 0.0 <= d.eval_fraction < 1.0:
        problems.append(f"data.eval_fraction={d.eval_fraction} must lie in [0, 1)")
    if d.bucket_window < 1 or d.worker_count < 0 or d.prefetch < 0 or d.num_epochs < 1:
        problems.append("data.bucket_window and data.num_epochs must be >= 1, data.worker_count "
                        "and data.prefetch >= 0")
    if t.micro_batch_size < 1 or t.global_batch_size % t.micro_batch_size:
        problems.append(f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                        f"train.micro_batch_size={t.micro_batch_size}")
    elif t.micro_batch_size % process_count:
        problems.append(f"train.micro_batch_size={t.micro_batch_size} must be a multiple of the "
                        f"number of processes ({process_count}): each feeds an equal share")
    if paired and (d.one_y_per_x or d.desirable_fraction < 1 or d.undesirable_fraction < 1):
        problems.append(f"loss.name={config.loss.name} trains on pairs: data.one_y_per_x and "
                        "data.*_fraction apply to unpaired losses only")
    problems.extend(packing.config_problems(d))
    if problems:
        raise UserError("invalid data config: " + "; ".join(problems) + ".")


def _split_rows(rows: RowSet, d) -> tuple[RowSet, RowSet | None, str]:
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


def batch_layout(config, tokenizer, process_index: int, process_count: int,
                 pack_groups: int | None = None) -> batching.BatchLayout:
    """The batches' shapes; with data.packing, packed in `pack_groups` groups of rows (default:
    the batch shards of config.mesh on jax.device_count() devices, as the step's mesh)."""
    d, t = config.data, config.train
    packed = {}
    if d.get("packing", False):
        if pack_groups is None:
            import jax  # pylint: disable=import-outside-toplevel
            pack_groups = configured_batch_shards(config.mesh, jax.device_count())
        if pack_groups % process_count or t.micro_batch_size % pack_groups:
            raise UserError(f"data.packing=True packs each of the {pack_groups} batch shards' "
                            f"examples apart: train.micro_batch_size={t.micro_batch_size} must "
                            f"be a multiple of {pack_groups}, itself a multiple of the "
                            f"{process_count} processes; change the batch size or config.mesh.")
        loss = get_loss(config.loss.name)
        packed = dict(pack_length=int(d.pack_length), pack_groups=int(pack_groups),
                      pack_second=loss.paired or loss.uses_kl)
    max_completion = d.max_completion_length or d.max_length
    prompt_buckets, completion_buckets = batching.bucket_sizes(
        d.bucket_lengths, d.max_prompt_length, max_completion)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return batching.BatchLayout(
        accumulation=t.global_batch_size // t.micro_batch_size, micro_batch=t.micro_batch_size,
        process_index=process_index, process_count=process_count,
        prompt_buckets=prompt_buckets, completion_buckets=completion_buckets, pad_id=int(pad_id),
        window=d.bucket_window, drop_remainder=d.drop_remainder, **packed)


def _prepare_split(name, rows, source, fmt, conversational, config, paired, tokenizer, layout,
                   tokenize_split):
    """Rows -> `SplitData` (fractions on train only)."""
    d = config.data
    no_signal: list[tuple[str, str, int]] = []   # (reason, where, examples): rows that teach nothing
    if fmt == "paired":
        items = formats.normalise_pairs(rows, conversational)
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
        raise UserError(f"loss.name={config.loss.name} needs paired data (prompt, chosen, "
                        f"rejected), but {rows.source} is {fmt}; use an unpaired loss such as kto.")
    else:
        items = formats.normalise_unpaired(rows, fmt, conversational,
                                           score_threshold=d.score_threshold,
                                           score_weighting=d.score_weighting)
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


def _summarize(config, fmt, conversational, paired, train, evaluation, eval_note, layout,
               fingerprint) -> DataSummary:
    lam_d, lam_u = config.loss.desirable_weight, config.loss.undesirable_weight
    n_d, n_u = train.n_desirable, train.n_undesirable
    recommended = None if paired else imbalance.balanced_weights(n_d, n_u)
    warnings = []
    uses_lambda = not paired and get_loss(config.loss.name).uses_lambda_weights  # eq. 8's λ
    auto = bool(uses_lambda and config.loss.auto_weights and recommended is not None)
    if auto:  # only a loss that weighs its classes gets eq. 9's weights (and says so)
        lam_d, lam_u = recommended
    if uses_lambda:
        warning = imbalance.ratio_warning(lam_d, lam_u, n_d, n_u)
        if warning:
            warnings.append(warning)
    elif config.loss.auto_weights:
        warnings.append(f"loss.auto_weights has no effect on loss {config.loss.name}, which does "
                        "not use lambda_D / lambda_U.")
    return DataSummary(
        format=fmt, conversational=conversational, paired=paired, loss=config.loss.name,
        train=train, eval=evaluation, eval_note=eval_note, desirable_weight=float(lam_d),
        undesirable_weight=float(lam_u), recommended_weights=recommended,
        uses_lambda_weights=uses_lambda, auto_weights_applied=auto,
        weight_ratio=None if paired else imbalance.weight_ratio(lam_d, lam_u, n_d, n_u),
        batch_shape=(layout.accumulation, layout.micro_batch, layout.local_micro_batch),
        fingerprint=fingerprint, warnings=warnings)


def _fingerprint(config, split: shards.ShardedSplit, layout: batching.BatchLayout) -> str:
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
    h.update(repr((shape, config.data.seed)).encode())
    if layout.pack_length:  # packed batches differ from padded ones (fields kept out of repr)
        h.update(repr(("packed", layout.pack_length, layout.pack_groups)).encode())
    return h.hexdigest()[:16]
