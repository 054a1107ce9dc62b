"""Host batches -> global device arrays, and the padded sizes the throughput numbers use.

The data pipeline hands each process numpy arrays [A, M_local, ...] (its rows of
every microbatch, kto_jax/batch.py); `to_global` assembles them into global
arrays [A, M, ...] on the step's batch sharding without any process seeing the
others' rows (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding

from kto_jax.batch import is_packed


def to_global(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Every array of this process's batch as one global array on `sharding`."""
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local.items()}


def is_paired(batch: Mapping[str, object]) -> bool:
    return "chosen_ids" in batch


def sequence_length(batch: Mapping[str, object]) -> int:
    """Padded prompt + completion length of every sequence in the batch; for a packed batch
    (data.packing) the row length data.pack_length."""
    if is_packed(batch):
        return int(batch["packed_ids"].shape[-1])
    completion = batch["chosen_ids"] if is_paired(batch) else batch["completion_ids"]
    return int(batch["prompt_ids"].shape[-1]) + int(completion.shape[-1])


def global_examples(batch: Mapping[str, jax.Array]) -> int:
    """A * M: examples (or pairs) in one global batch."""
    shape = batch["valid"].shape
    return int(shape[0]) * int(shape[1])


def global_sequences(batch: Mapping[str, jax.Array]) -> int:
    """The sequences of `sequence_length` one forward runs per microbatch, times A: A * M
    examples padded, A * R rows packed."""
    if is_packed(batch):
        shape = batch["packed_ids"].shape
        return int(shape[0]) * int(shape[1])
    return global_examples(batch)


def padded_tokens(batch: Mapping[str, jax.Array]) -> int:
    """Tokens of the sequences the policy trains on, padding included (A * M * T, x2 if paired;
    packed: the A * R * T positions of the rows, each example's x once).

    The convention of the performance comparisons (docs/design.md, "Performance facts"): 32 x 1024 tokens per
    step for 32 sequences padded to 1024.
    """
    if is_packed(batch):
        return global_sequences(batch) * sequence_length(batch)
    sequences = 2 if is_paired(batch) else 1
    return global_examples(batch) * sequences * sequence_length(batch)
