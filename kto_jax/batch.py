"""The batch layout shared by the data pipeline and the train step: one table of keys,
shapes and dtypes (`UNPAIRED_FIELDS`, `PAIRED_FIELDS` and their precomputed extras).

Every array has leading dims [A, M]: A gradient-accumulation microbatches of M
examples each. The step scans over A; the M axis is sharded over ('data', 'fsdp').
Prompts and completions are stored apart so the mismatched KL pairs of the paper
(x_i, y_{i+1 mod M}) are a gather of the completion arrays along the M axis, inside the
jitted step, within one microbatch: `kl_partners` (the next REAL row, so the filler
rows at the end of an epoch's last microbatch are never a KL completion).

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

Packed batches (data.packing; kto_jax/data/packing.py): instead of the prompt and
completion arrays, R rows of T = data.pack_length tokens per microbatch, each holding
whole examples [x | y | y2] (y2: the KL completion y_{i+1 mod M}, or y_l of a pair),
plus per-example gathers into those rows:
  packed_ids, packed_positions, packed_segment_ids, packed_branch_ids   int32 [A, R, T]
  {y}_ids, {y}_mask, {y}_index  int32 [A, M, C] for y in (completion, kl) or
                                (chosen, rejected); index: where in the rows the
                                hidden state predicting each token is
  prompt_length                 int32 [A, M]  len(x) (the real-token count)
  desirable, weight, valid (unpaired) / valid (paired), and the optional precomputed
  reference log-probs, per example [A, M] as above.
R is sharded like M (the packer packs each batch shard's examples into its own rows).

Packed unpaired batches of a loss with z0 (loss.uses_kl) put the KL completions in a
SECOND stream instead (`packing.pack_streams`): main rows [R, T] hold whole examples
[x | y] only (branch ids 0 and 1), and kl rows parallel to them
  kl_row_ids, kl_row_positions, kl_row_segment_ids   int32 [A, R, Tk]
hold, in kl row r, the KL completions y_kl of main row r's examples, each with its
example's segment id and positions continuing len(x). They run without gradient and
attend the x keys of their example in main row r (kto_jax/models/transformer.py), so
y_kl rides no backward. Tk = kl_share * T rounded up to 8 (`packing.kl_row_length`).
kl_index then points, for token 0, at x's last token in the main rows and, for token
j > 0, past the group's main rows into its kl rows (`packing.pack_streams`).

The data pipeline (kto_jax/data/batching.py) puts its arrays through `as_batch`; the
AOT compiler, the benchmark and the tests build their batches from `batch_shapes`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from kto_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class BatchField:
    """One array of a batch: its key, dtype and trailing length ("prompt": P, "completion": C,
    "row": a packed row [A, R, T] instead of [A, M, ...])."""
    name: str
    dtype: type
    length: str | None = None   # None: shape [A, M]; else [A, M, P], [A, M, C], [A, R, T] or
                                # [A, R, Tk] ("kl_row")


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

# The packed layout's names (kto_jax/data/packing.py writes them, kto_jax/step/stats.py reads them):
ROW_KEYS = ("packed_ids", "packed_positions", "packed_segment_ids", "packed_branch_ids")
UNPAIRED_NAMES = ("completion", "kl")     # key prefixes of y and y_kl = y_{i+1 mod M}
PAIRED_NAMES = ("chosen", "rejected")     # key prefixes of y_w and y_l
KL_ROW_KEYS = ("kl_row_ids", "kl_row_positions", "kl_row_segment_ids")   # the kl stream
_ROWS = tuple(BatchField(n, np.int32, "row") for n in ROW_KEYS)
_KL_ROWS = tuple(BatchField(n, np.int32, "kl_row") for n in KL_ROW_KEYS)


def _packed_side(name: str) -> tuple[BatchField, ...]:
    return tuple(BatchField(f"{name}_{k}", np.int32, "completion") for k in ("ids", "mask", "index"))


PACKED_UNPAIRED_FIELDS = _ROWS + _packed_side(UNPAIRED_NAMES[0]) + _packed_side(UNPAIRED_NAMES[1]) + (
    BatchField("prompt_length", np.int32),) + UNPAIRED_FIELDS[-3:]
PACKED_STREAM_FIELDS = PACKED_UNPAIRED_FIELDS[:len(_ROWS)] + _KL_ROWS + PACKED_UNPAIRED_FIELDS[
    len(_ROWS):]
PACKED_PAIRED_FIELDS = _ROWS + _packed_side(PAIRED_NAMES[0]) + _packed_side(PAIRED_NAMES[1]) + (
    BatchField("prompt_length", np.int32), BatchField("valid", np.bool_))

UNPAIRED_KEYS = tuple(f.name for f in UNPAIRED_FIELDS)
PAIRED_KEYS = tuple(f.name for f in PAIRED_FIELDS)
PRECOMPUTED_UNPAIRED_KEYS = tuple(f.name for f in PRECOMPUTED_UNPAIRED_FIELDS)
PRECOMPUTED_PAIRED_KEYS = tuple(f.name for f in PRECOMPUTED_PAIRED_FIELDS)


@dataclasses.dataclass(frozen=True)
class BatchSize:
    """config.train's batch: `global_batch` examples per optimizer step, in A = global_batch /
    micro_batch microbatches of `micro_batch` examples (the [A, M] of every array above)."""
    global_batch: int
    micro_batch: int

    @property
    def accumulation(self) -> int:
        return self.global_batch // self.micro_batch

    def problems(self, *, z0_loss: str | None = None, process_count: int = 1,
                 shards: int = 1, shard_axes: tuple[str, ...] = (),
                 pack_groups: int | None = None) -> list[str]:
        """Every batch-size rule, in one place: what is wrong with this batch, as phrases.

        Args:
          z0_loss: the name of a loss that estimates z0 from the KL pairs of a
            microbatch (it needs microbatches of at least 2), or None.
          process_count: processes that each feed an equal share of every microbatch.
          shards, shard_axes: devices the batch axis is split over, and their mesh axes.
          pack_groups: packing groups of a packed batch (data.packing), or None.
        """
        g, m = self.global_batch, self.micro_batch
        if z0_loss is not None and m < 2:
            return [f"config.train.micro_batch_size={m}: loss {z0_loss!r} estimates z0 from the "
                    "mismatched pairs (x_i, y_{i+1}) within a microbatch, which needs at least 2 "
                    "examples. Set --config.train.micro_batch_size=2 or more."]
        if m < 1 or g % m:
            return [f"train.global_batch_size={g} must be a multiple of "
                    f"train.micro_batch_size={m} (a positive number)"]
        out = []
        if m % process_count:
            out.append(f"train.micro_batch_size={m} must be a multiple of the number of "
                       f"processes ({process_count}): each feeds an equal share")
        if m % shards:
            out.append(f"config.train.micro_batch_size={m} must be a multiple of the {shards} "
                       f"devices the batch is split over (mesh axes {shard_axes}); change the "
                       "micro batch size or config.mesh.")
        if pack_groups is not None and (pack_groups % process_count or m % pack_groups):
            out.append(f"data.packing=True packs each of the {pack_groups} batch shards' "
                       f"examples apart: train.micro_batch_size={m} must be a multiple of "
                       f"{pack_groups}, itself a multiple of the {process_count} processes; "
                       "change the batch size or config.mesh.")
        return out

    def check(self, **kwargs) -> None:
        """UserError naming every problem of `problems(**kwargs)`."""
        problems = self.problems(**kwargs)
        if problems:
            raise UserError("; ".join(problems))


def batch_fields(paired: bool, precomputed: bool = False, packed: bool = False,
                 kl_stream: bool = False) -> tuple[BatchField, ...]:
    """The fields of a paired or unpaired batch, padded or `packed` (unpaired: with the
    `kl_stream` of KL completions, or with them in the trees); `precomputed` adds the
    reference log-probs."""
    if packed:
        fields = (PACKED_PAIRED_FIELDS if paired else
                  PACKED_STREAM_FIELDS if kl_stream else PACKED_UNPAIRED_FIELDS)
    else:
        fields = PAIRED_FIELDS if paired else UNPAIRED_FIELDS
    if precomputed:
        fields += PRECOMPUTED_PAIRED_FIELDS if paired else PRECOMPUTED_UNPAIRED_FIELDS
    return fields


def step_keys(paired: bool, packed: bool = False, kl_stream: bool = False) -> tuple[str, ...]:
    """The keys the train step reads from a batch of that layout (no precomputed ones)."""
    return tuple(f.name for f in batch_fields(paired, packed=packed, kl_stream=kl_stream))


def kl_partners(valid, xp=np):
    """int [..., M]: the row whose completion is row i's KL completion, per microbatch.

    The next valid row after i, cyclically: i + 1 mod M when every row is real; with
    n real rows first and filler after them (an epoch's last batch), real row i gets
    y_{i+1 mod n}, never a filler's. A row that is the only real one gets itself (no
    mismatched pair exists: `kl_pair_valid` is then False); a filler row gets the next
    real row (its pair is masked anyway). One rule for the step (`xp=jax.numpy`, inside
    jit) and the host-built packed layout (`xp=numpy`).

    Args:
      valid: bool [..., M], the microbatch's `valid` (leading axes are microbatches).
    """
    m = valid.shape[-1]
    i = xp.arange(m)
    steps = (i[None, :] - i[:, None] - 1) % m             # [i, j]: j is row i + 1 + steps
    steps = xp.where(xp.asarray(valid)[..., None, :], steps, m)
    return xp.argmin(steps, axis=-1)


def kl_pair_valid(valid, xp=np):
    """bool [..., M]: row i is real and its KL partner is another real row (`kl_partners`)."""
    valid = xp.asarray(valid).astype(bool)
    partners = kl_partners(valid, xp)
    return valid & (partners != xp.arange(valid.shape[-1])) & xp.take_along_axis(
        valid, partners, axis=-1)


def is_packed(batch: Mapping[str, object]) -> bool:
    """Whether a batch has the packed layout (rows of whole examples)."""
    return "packed_ids" in batch


def has_kl_stream(batch: Mapping[str, object]) -> bool:
    """Whether a packed batch carries its KL completions in kl rows (`packing.pack_streams`)."""
    return KL_ROW_KEYS[0] in batch


def batch_shapes(paired: bool, *, accumulation: int, micro_batch: int, prompt_len: int,
                 completion_len: int, precomputed: bool = False, rows: int = 0,
                 pack_length: int = 0, kl_length: int = 0
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of one batch [A, M, ...] with prompts of P and completions of C tokens;
    with `rows` R > 0 the packed layout, R rows of `pack_length` T tokens per microbatch, and
    with `kl_length` Tk > 0 (unpaired) R kl rows of Tk tokens too."""
    lengths = {None: (), "prompt": (int(prompt_len),), "completion": (int(completion_len),),
               "row": (int(pack_length),), "kl_row": (int(kl_length),)}
    out = {}
    for f in batch_fields(paired, precomputed, packed=rows > 0, kl_stream=kl_length > 0):
        lead = (int(accumulation), int(rows if f.length in ("row", "kl_row") else micro_batch))
        trail = lengths[f.length]
        out[f.name] = (lead + trail, np.dtype(f.dtype))
    return out


def as_batch(arrays: Mapping[str, np.ndarray], paired: bool) -> dict[str, np.ndarray]:
    """`arrays` in the table's dtypes (no copy when they already match), keys in table order.

    The layout's keys (padded, or packed when `packed_ids` is there) must all be there;
    its precomputed reference keys may be. Raises KeyError naming a missing or unknown key.
    """
    packed, stream = is_packed(arrays), has_kl_stream(arrays)
    fields = batch_fields(paired, precomputed=True, packed=packed, kl_stream=stream)
    missing = [f.name for f in batch_fields(paired, packed=packed, kl_stream=stream)
               if f.name not in arrays]
    unknown = [k for k in arrays if k not in {f.name for f in fields}]
    if missing or unknown:
        raise KeyError(f"{'paired' if paired else 'unpaired'} batch: missing {missing}, "
                       f"unknown {unknown}")
    return {f.name: np.asarray(arrays[f.name], f.dtype) for f in fields if f.name in arrays}
