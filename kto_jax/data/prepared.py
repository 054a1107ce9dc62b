"""Prepared data sets: tokenise once (`kto-jax data prepare`), then each process reads only its rows.

Without preparation every process reads and normalises the whole data file (JSONL
and JSON have no random access) and tokenises its 1/n share at start-up, so start-up
time and host memory grow with the data set. `prepare` does that work once, in one
process, with exactly the checks and errors of a training run (`kto_jax/data/prepare.py`
calls the same `pipeline.read_splits`), and writes a directory:

  DIR/prepared.json              the data settings and tokenizer it was made with, the
                                 format, and per split what the summary reports (rows
                                 read, examples, subsampling, drops and truncations)
  DIR/<split>/stats.npz          per kept example: prompt length, completion length(s),
                                 label, weight, CRC of the ids (what the batch planner,
                                 the summary and the data fingerprint need; ~17 bytes a row)
  DIR/<split>/tokens.array_record  one record per kept example (ArrayRecord, one record per
                                 chunk, so any record is one read): int32
                                 [sides, prompt len, side lens..., prompt ids, side ids...]

for split in train and (when the config makes one) eval. Training with
`data.train_path=DIR` loads the statistics (every process plans every batch, as
before, without an all-gather) and reads, through an ArrayRecord reader (`open_tokens`),
only the records of its own rows of each batch. Batches, the summary and the data
fingerprint are the same as from the original file, so a run may switch between the
two and resume exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from typing import Any

import numpy as np

from kto_jax import fs
from kto_jax.data import tokenize
from kto_jax.data.shards import RowTokens, SplitData
from kto_jax.errors import UserError

META_FILE = "prepared.json"
TOKENS_FILE = "tokens.array_record"
STATS_FILE = "stats.npz"
VERSION = 1
# The config.data fields a prepared directory depends on (besides train_path itself).
SETTINGS = ("format", "eval_path", "eval_fraction", "train_split", "eval_split", "seed",
            "score_threshold", "score_weighting", "one_y_per_x", "desirable_fraction",
            "undesirable_fraction", "max_length", "max_prompt_length", "max_completion_length",
            "on_overlong", "on_prefix_mismatch")


def is_prepared(path: str) -> bool:
    """Is `path` a directory written by `prepare`?"""
    return bool(path) and fs.isfile(fs.join(path, META_FILE))


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what tokenization depends on: vocabulary, pre/post-processing, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    h = hashlib.sha256(vocab.encode())
    h.update(repr((getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id,
                   tokenizer.eos_token_id, tokenizer.pad_token_id)).encode())
    return h.hexdigest()[:16]


def settings(config, paired: bool, tokenizer) -> dict[str, Any]:
    d = config.data
    out = {key: d[key] for key in SETTINGS}
    out["paired"], out["tokenizer"] = paired, tokenizer_fingerprint(tokenizer)
    return json.loads(json.dumps(out))   # tuples -> lists, as read back


def decode_record(record: bytes) -> tuple[np.ndarray, list[np.ndarray]]:
    """(prompt ids, [completion ids per side]) of one tokens record."""
    values = np.frombuffer(record, np.int32)
    sides = int(values[0])
    lengths = values[1:2 + sides]
    bounds = np.cumsum(np.concatenate([[2 + sides], lengths]))
    parts = [values[bounds[k]:bounds[k + 1]] for k in range(1 + sides)]
    return parts[0], parts[1:]


def open_tokens(path: str):
    """An ArrayRecord reader tuned for random access, reading in the calling thread.

    Not grain's `ArrayRecordDataSource`: its `__getitems__` reads through a new thread
    pool on every call, and glibc gives each new thread its own malloc arenas, so a
    process's memory grew by ~1.5 MiB per batch read (300 MiB over 200 batches of 32
    rows, measured). No readahead and no reader threads keep it flat; the reader holds
    the file's chunk index in memory (~16 bytes per record).
    """
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    return array_record_module.ArrayRecordReader(
        path, options="readahead_buffer_size:0,max_parallelism:0", file_reader_buffer_size=32768)


class PreparedSplit(tokenize.SplitLengths):
    """A prepared split: global statistics in memory, tokens read by row on demand.

    The batching interface of `shards.ShardedSplit` (lengths, label, weight,
    token_hash, paired, row_tokens). `rows_read` counts the records this process read.
    """

    def __init__(self, directory: str):
        self.directory = directory
        with np.load(os.path.join(directory, STATS_FILE)) as z:
            self.prompt_lengths = z["prompt_lengths"]
            self.side_lengths = tuple(z["side_lengths"])
            self.label, self.weight, self.token_hash = z["label"], z["weight"], z["token_hash"]
        self.rows_read = 0
        self._source = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def __getstate__(self) -> dict:   # grain worker processes reopen the file
        state = dict(self.__dict__)
        state["_source"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def row_tokens(self, rows: np.ndarray) -> RowTokens:
        """Tokens of the example ids in `rows` (any shape), each record read once."""
        ids = np.unique(rows)
        with self._lock:
            if self._source is None:
                self._source = open_tokens(os.path.join(self.directory, TOKENS_FILE))
            records = self._source.read([int(i) for i in ids])
            self.rows_read += len(ids)
        prompts, completions = {}, tuple({} for _ in self.side_lengths)
        for i, record in zip(ids, records):
            prompt, sides = decode_record(record)
            prompts[int(i)] = prompt
            for s, side in enumerate(sides):
                completions[s][int(i)] = side
        return RowTokens(prompts, completions, self.label, self.weight, self.paired)


def open_splits(config, tokenizer, paired: bool
                ) -> tuple[str, bool, dict[str, SplitData], str]:
    """`pipeline.read_splits` for a prepared directory: checks its settings, loads statistics.

    Raises:
      UserError: the directory was prepared with other data settings, loss kind or
        tokenizer, or lies in an object store (ArrayRecord needs a file system).
    """
    path = config.data.train_path
    if fs.is_remote(path):
        raise UserError(f"data.train_path={path!r}: a prepared directory is read with ArrayRecord, "
                        "which needs a file system path; mount the bucket (gcsfuse) and point "
                        "data.train_path at the mount, or copy the directory to local disk.")
    meta = json.loads(fs.read_text(fs.join(path, META_FILE)))
    if meta.get("version") != VERSION:
        raise UserError(f"{path} was prepared by another kto-jax version (format "
                        f"{meta.get('version')}, this one reads {VERSION}); prepare it again.")
    want, have = settings(config, paired, tokenizer), meta["settings"]
    diff = [key for key in want if want[key] != have.get(key)]
    if diff:
        shown = "; ".join(f"{_label(k)}: prepared {have.get(k)!r}, config {want[k]!r}"
                          for k in diff)
        raise UserError(f"data.train_path={path!r} was prepared with other settings ({shown}); "
                        "run `kto-jax data prepare` again with this config, or train with the "
                        "settings it was prepared with.")
    splits = {}
    for name, info in meta["splits"].items():
        report = tokenize.TokenReport(**info["report"])
        splits[name] = SplitData(name, PreparedSplit(os.path.join(path, name)), info["source"],
                                 info["rows"], info["examples"], info["subsampled"], report)
    return meta["format"], meta["conversational"], splits, meta["eval_note"]


def _label(key: str) -> str:
    return {"paired": "paired loss", "tokenizer": "tokenizer"}.get(key, f"data.{key}")

