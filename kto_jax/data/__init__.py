"""Feedback data: TRL-format files -> checked, balanced, tokenized, static-shape batches.

The one entry point the trainer calls:

    from kto_jax.data import build_datasets
    data = read_settings(config).data       # DataSettings (kto_jax/train/settings.py)
    train_iter_factory, eval_batches, summary = build_datasets(data, tokenizer)

    it = train_iter_factory()              # data.num_epochs; forever=True for endless
    it.set_state(saved_state)              # optional: resume at exactly the next batch
    for batch in it: ...                   # dict of numpy arrays [A, M_local, ...]
    saved_state = it.get_state()           # JSON-able; grain's checkpoint protocol
    for batch in eval_batches(): ...       # one pass; None when there is no eval split
    lam_d, lam_u = summary.desirable_weight, summary.undesirable_weight  # eq. 9 if auto_weights
    print(summary)                         # what was read, dropped and why; lengths; λ advice

Batches follow kto_jax/batch.py: unpaired keys (prompt_ids/mask left-padded to
P, completion_ids/mask right-padded to C, desirable, weight, valid) for the
unpaired losses, paired keys (prompt, chosen, rejected, valid) when
`data.paired` (the loss's kind). A = global_batch_size / micro_batch_size;
each process yields rows [p*M/n, (p+1)*M/n) of every microbatch, so the
processes' slices concatenated along axis 1 in process order are the global
batch, identical to a single-process run with the same seed. Feed them to
`jax.make_array_from_process_local_data` with the batch axis sharded so that
process p's devices hold that block.

The last partial batch of an epoch is padded with filler rows (valid=False,
weight 0, copies of real rows) spread so each microbatch keeps about the same
number of real rows; `data.drop_remainder=True` drops it instead (reported).

Order of work on each of n processes: read and normalise the whole file (JSONL
and JSON have no random access); tokenize only this process's 1/n slice of the
examples and all-gather small per-example statistics (lengths, drops, a CRC of
the ids), so every process knows n_D/n_U, the drops and every batch's shape; then
per epoch a seeded global shuffle into batches, this process's rows of each, and
only those rows tokenized (cached when in its own slice; with one process all
are), padded and prefetched.

Modules: readers (files -> rows), formats (TRL formats -> examples), imbalance
(fractions, eq. 9), tokenize (chat template, truncation, prefix guarantee,
per-example statistics), shards (per-process tokenization: all-gather, cache,
batch-time tokens), batching (plans, buckets, padding), iterator (the grain
pipeline and its state), pipeline (build_datasets), prepared (`kto-jax data
prepare`: tokenised once, each process reads only its rows), summary. `kto-jax data
inspect|prepare` (kto_jax/commands/data.py) prints the summary / writes the prepared
directory. See docs/data.md.
"""

from kto_jax.data.iterator import FeedbackIterator
from kto_jax.data.pipeline import Datasets, build_datasets
from kto_jax.data.settings import DataSettings
from kto_jax.data.summary import DataSummary, SplitSummary

__all__ = ["build_datasets", "Datasets", "DataSettings", "DataSummary", "SplitSummary",
           "FeedbackIterator"]
