"""`kto-jax data prepare`: read, validate and tokenise config.data once, and write the
prepared directory that `kto_jax/data/prepared.py` describes and reads."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from kto_jax import fs
from kto_jax.data import pipeline, prepared
from kto_jax.data.shards import ShardedSplit
from kto_jax.errors import UserError
from kto_jax.losses.registry import get_loss


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
            _write_split(os.path.join(local, name), data.split)
            meta["splits"][name] = {
                "source": data.source, "rows": data.rows, "examples": data.examples,
                "subsampled": data.subsampled, "report": dataclasses.asdict(data.report),
                "kept": len(data.split)}
        with open(os.path.join(local, prepared.META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    return meta


def _write_split(directory: str, split: ShardedSplit) -> None:
    """stats.npz and tokens.array_record of one split (all its tokens are in `split.cache`)."""
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    os.makedirs(directory, exist_ok=True)
    np.savez(os.path.join(directory, prepared.STATS_FILE), prompt_lengths=split.prompt_lengths.astype(np.int32),
             side_lengths=np.stack(split.side_lengths).astype(np.int32), label=split.label,
             weight=split.weight, token_hash=split.token_hash.astype(np.uint32))
    cache, sides = split.cache, len(split.side_lengths)
    writer = array_record_module.ArrayRecordWriter(os.path.join(directory, prepared.TOKENS_FILE),
                                                   "group_size:1")
    try:
        for i in range(len(cache)):
            parts = [cache.prompts[i], *(cache.completions[s][i] for s in range(sides))]
            head = np.array([sides, *(len(p) for p in parts)], np.int32)
            writer.write(np.concatenate([head, *parts]).astype(np.int32).tobytes())
    finally:
        writer.close()
