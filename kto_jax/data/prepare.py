"""`kto-jax data prepare`: read, validate and tokenise config.data once, and write the
prepared directory that `kto_jax/data/prepared.py` describes and reads."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from kto_jax import fs
from kto_jax.data import pipeline, prepared
from kto_jax.data.shards import ShardedSplit
from kto_jax.errors import UserError
from kto_jax.losses.registry import get_loss

_WRITE_CHUNK = 65536   # examples per write to tokens.bin


def prepare(config, tokenizer, out: str) -> dict[str, Any]:
    """Reads, validates and tokenises config.data once and writes the directory `out`.

    Raises the same `UserError`s as a training run on the same config. Returns the
    contents of prepared.json.
    """
    d = config.data
    if prepared.is_prepared(d.train_path):
        raise UserError(f"data.train_path={d.train_path!r} is already a prepared directory; "
                        "point it at the original data file to prepare again.")
    paired = get_loss(config.loss.name).paired
    pipeline.check_config(config, paired, 1)
    layout = pipeline.batch_layout(config, tokenizer, 0, 1)
    fmt, conversational, splits, eval_note = pipeline.read_splits(config, tokenizer, layout, paired)
    meta = {"version": prepared.VERSION, "settings": prepared.settings(config, paired, tokenizer),
            "format": fmt, "conversational": conversational, "eval_note": eval_note,
            "splits": {}}
    with fs.staged_dir(out) as local:
        for name, data in splits.items():
            meta["splits"][name] = {
                "source": data.source, "rows": data.rows, "examples": data.examples,
                "subsampled": data.subsampled, "report": dataclasses.asdict(data.report),
                "kept": len(data.split),
                "layout": _write_split(os.path.join(local, name), data.split, d.max_length,
                                       len(tokenizer))}
        with open(os.path.join(local, prepared.META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    return meta


def _write_split(directory: str, split: ShardedSplit, max_length: int, vocab_size: int
                 ) -> dict[str, Any]:
    """The files of one split (all its tokens are in `split.cache`); returns its layout."""
    cache = split.cache
    writer = prepared.SplitWriter(directory, max_length=max_length, vocab_size=vocab_size,
                                  sides=len(split.side_lengths))
    for lo in range(0, len(cache), _WRITE_CHUNK):
        hi = min(lo + _WRITE_CHUNK, len(cache))
        writer.add(cache.prompts.slice(lo, hi), tuple(c.slice(lo, hi) for c in cache.completions),
                   split.label[lo:hi], split.weight[lo:hi], split.token_hash[lo:hi])
    return writer.close()
