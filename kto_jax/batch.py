"""The batch layout shared by the data pipeline and the train step: one table of keys,
shapes and dtypes (`UNPAIRED_FIELDS`, `PAIRED_FIELDS` and their precomputed extras).

Every array has leading dims [A, M]: A gradient-accumulation microbatches of M
examples each. The step scans over A; the M axis is sharded over ('data', 'fsdp').
Prompts and completions are stored apart so the mismatched KL pairs of the paper
(x_i, y_{i+1 mod M}) are a `jnp.roll` of the completion arrays along the M axis,
inside the jitted step, within one microbatch.

Unpaired batches (KTO and every loss on binary feedback):
  prompt_ids        int32 [A, M, P]  left-padded with the pad id
  prompt_mask       int32 [A, M, P]  1 on real prompt tokens
  completion_ids    int32 [A, M, C]  right-padded
  completion_mask   int32 [A, M, C]  1 on real completion tokens
  desirable         bool  [A, M]     thumbs up (True) / down (False)
  weight            f32   [A, M]     per-example weight (1.0 unless scored data)
  valid             bool  [A, M]     False on filler rows that pad the last batch
  reference_logps     f32 [A, M]     optional: precomputed log pi_ref(y|x)
  reference_kl_logps  f32 [A, M]     optional: precomputed log pi_ref(y_{i+1}|x_i)

Paired batches (DPO, IPO, ORPO, SimPO, SLiC, ...): the same prompt arrays plus
  chosen_ids, chosen_mask, rejected_ids, rejected_mask   int32 [A, M, C]
  valid                                                  bool  [A, M]
  reference_chosen_logps, reference_rejected_logps       f32 [A, M] (optional)

The data pipeline (kto_jax/data/batching.py) puts its arrays through `as_batch`; the
AOT compiler, the benchmark and the tests build their batches from `batch_shapes`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchField:
    """One array of a batch: its key, dtype and trailing length ("prompt": P, "completion": C)."""
    name: str
    dtype: type
    length: str | None = None   # None: shape [A, M]; else [A, M, P] or [A, M, C]


_PROMPT = (BatchField("prompt_ids", np.int32, "prompt"), BatchField("prompt_mask", np.int32, "prompt"))
UNPAIRED_FIELDS = _PROMPT + (
    BatchField("completion_ids", np.int32, "completion"),
    BatchField("completion_mask", np.int32, "completion"),
    BatchField("desirable", np.bool_), BatchField("weight", np.float32), BatchField("valid", np.bool_))
PAIRED_FIELDS = _PROMPT + (
    BatchField("chosen_ids", np.int32, "completion"), BatchField("chosen_mask", np.int32, "completion"),
    BatchField("rejected_ids", np.int32, "completion"),
    BatchField("rejected_mask", np.int32, "completion"), BatchField("valid", np.bool_))
PRECOMPUTED_UNPAIRED_FIELDS = (BatchField("reference_logps", np.float32),
                               BatchField("reference_kl_logps", np.float32))
PRECOMPUTED_PAIRED_FIELDS = (BatchField("reference_chosen_logps", np.float32),
                             BatchField("reference_rejected_logps", np.float32))

UNPAIRED_KEYS = tuple(f.name for f in UNPAIRED_FIELDS)
PAIRED_KEYS = tuple(f.name for f in PAIRED_FIELDS)
PRECOMPUTED_UNPAIRED_KEYS = tuple(f.name for f in PRECOMPUTED_UNPAIRED_FIELDS)
PRECOMPUTED_PAIRED_KEYS = tuple(f.name for f in PRECOMPUTED_PAIRED_FIELDS)


def batch_fields(paired: bool, precomputed: bool = False) -> tuple[BatchField, ...]:
    """The fields of a paired or unpaired batch; `precomputed` adds the reference log-probs."""
    fields = PAIRED_FIELDS if paired else UNPAIRED_FIELDS
    if precomputed:
        fields += PRECOMPUTED_PAIRED_FIELDS if paired else PRECOMPUTED_UNPAIRED_FIELDS
    return fields


def batch_shapes(paired: bool, *, accumulation: int, micro_batch: int, prompt_len: int,
                 completion_len: int, precomputed: bool = False
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of one batch [A, M, ...] with prompts of P and completions of C tokens."""
    lengths = {None: (), "prompt": (int(prompt_len),), "completion": (int(completion_len),)}
    return {f.name: ((int(accumulation), int(micro_batch)) + lengths[f.length], np.dtype(f.dtype))
            for f in batch_fields(paired, precomputed)}


def as_batch(arrays: Mapping[str, np.ndarray], paired: bool) -> dict[str, np.ndarray]:
    """`arrays` in the table's dtypes (no copy when they already match), keys in table order.

    The layout's keys must all be there; its precomputed reference keys may be. Raises
    KeyError naming a missing or unknown key.
    """
    fields = batch_fields(paired, precomputed=True)
    missing = [f.name for f in batch_fields(paired) if f.name not in arrays]
    unknown = [k for k in arrays if k not in {f.name for f in fields}]
    if missing or unknown:
        raise KeyError(f"{'paired' if paired else 'unpaired'} batch: missing {missing}, "
                       f"unknown {unknown}")
    return {f.name: np.asarray(arrays[f.name], f.dtype) for f in fields if f.name in arrays}
