"""`kto-jax data prepare`: read, validate and tokenise config.data once, and write the
prepared directory that `kto_jax/data/prepared.py` describes and reads.

Tokenisation streams: the examples are tokenised `_CHUNK` at a time and each chunk's
kept ids are appended to tokens.bin at once, so the tokens (the largest part: the
tokenizer's Python lists cost ~1.6 KB an example) are never all in memory. The
output bytes do not depend on the chunk size (tested). The rows' text and the
normalised examples are still held whole (see docs/data.md, "Preparing").
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import numpy as np

from kto_jax import fs
from kto_jax.data import pipeline, prepared, tokenize
from kto_jax.data.formats import Examples
from kto_jax.data.settings import DataSettings
from kto_jax.errors import UserError

_CHUNK = 16384   # examples tokenised and written at a time


def prepare(d: DataSettings, tokenizer, out: str) -> dict[str, Any]:
    """Reads, validates and tokenises the data of `d` once and writes the directory `out`.

    Raises the same `UserError`s as a training run on the same config. Returns the
    contents of prepared.json (written last: a directory without it is not prepared).
    """
    if prepared.is_prepared(d.train_path):
        raise UserError(f"data.train_path={d.train_path!r} is already a prepared directory; "
                        "point it at the original data file to prepare again.")
    d = d.replace(pack_groups=1)   # reading only: the packing groups of the run do not matter
    pipeline.check_config(d, 1)
    layout = pipeline.batch_layout(d, tokenizer, 0, 1)
    with fs.staged_dir(out) as local:
        layouts = {}

        def write_split(name, examples, spec):
            layouts[name], report = _write_split(os.path.join(local, name), examples, spec, d,
                                                 len(tokenizer))
            return prepared.PreparedSplit(os.path.join(local, name), layouts[name]), report

        fmt, conversational, splits, eval_note = pipeline.read_splits(
            d, tokenizer, layout, tokenize_split=write_split)
        meta = {"version": prepared.VERSION,
                "settings": prepared.settings(d, tokenizer),
                "format": fmt, "conversational": conversational, "eval_note": eval_note,
                "splits": {name: {"source": data.source, "rows": data.rows,
                                  "examples": data.examples, "subsampled": data.subsampled,
                                  "report": dataclasses.asdict(data.report),
                                  "kept": len(data.split), "layout": layouts[name]}
                           for name, data in splits.items()}}
        with open(os.path.join(local, prepared.META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    return meta


def _write_split(directory: str, examples: Examples, spec: tokenize.TokenSpec, d,
                 vocab_size: int) -> tuple[dict[str, Any], tokenize.TokenReport]:
    """Tokenises one split's examples a chunk at a time into `directory`.

    The same statistics, report and errors as `shards.tokenize_sharded` in one process
    (the error policies are applied once all statistics are in; on an error the
    directory is removed). Returns the split's layout for prepared.json and its report.
    """
    items = examples.items
    writer = prepared.SplitWriter(directory, max_length=d.max_length, vocab_size=vocab_size,
                                  sides=1 + examples.paired)
    stats = []
    try:
        for lo in range(0, len(items), _CHUNK):
            chunk_examples = examples.subset(slice(lo, lo + _CHUNK))
            chunk_stats, tokens = tokenize.tokenize_items(chunk_examples.items, spec)
            kept = np.flatnonzero(chunk_stats[:, tokenize.CODE] == tokenize.KEPT)
            if len(kept):
                split = tokenize.build_split(chunk_examples.subset(kept),
                                            [tokens[i] for i in kept])
                writer.add(split.prompts, split.completions, split.desirable, split.weight,
                           chunk_stats[kept, tokenize.HASH])
            stats.append(chunk_stats)
        layout = writer.close()
        all_stats = np.concatenate(stats) if stats else np.zeros((0, tokenize.N_STATS), np.int64)
        report = tokenize.report_from_stats(items, all_stats, spec, on_overlong=d.on_overlong,
                                            on_prefix_mismatch=d.on_prefix_mismatch)
    except BaseException:
        writer.abort()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return layout, report
