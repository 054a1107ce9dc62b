"""Precomputed reference log-probs: computed once, stored next to the data, attached to batches.

Why: with `config.reference.source="model"` every train step runs the frozen
reference on (x, y) and on the KL pairs (x_i, y_{i+1}), a third of a KTO step's
FLOPs. `kto-jax precompute-ref` runs those forwards once and stores the results;
a run with `reference.source="precomputed"` and `data.reference_logps_path=DIR`
reads them instead (kto_jax/batch.py: `reference_logps`, `reference_kl_logps`,
or `reference_chosen_logps`, `reference_rejected_logps` for paired losses).

The KL pairs are the catch. Row i of a microbatch is paired with the next real row
of the SAME microbatch (`kto_jax.batch.kl_partners` inside the step), so log pi_ref(y_{i+1}|x_i) depends
on which examples share a microbatch, in which order: on the seed, the epoch, the
batch sizes, the bucketing window and the data. The data pipeline makes every
batch a pure function of its global index (kto_jax/data/batching.py), so the
store is keyed by *slot*, not by example: for global batch k of a split it holds
[A, M] arrays in the global layout, computed by the step's own reference forward
(`kto_jax.step.stats.reference_logps`, KL batch paired within each microbatch;
kto_jax/train/precompute.py runs it).

Files in DIR:
  meta.json        version, loss, keys, batch sizes, the data fingerprint and a
                   summary of the config that produced it;
  train.npz        per key float32 [N, A, M]; `row_checksum` uint32 [N, A, M, 2];
  eval.npz         the same for the eval split (when there is one).

Safety: every attached batch is checked row by row against `row_checksum`, a
hash of the row's prompt and completion tokens; a store made for other data,
another seed or batch layout, or fewer steps fails loudly (UserError) at the
first mismatching batch instead of training on wrong numbers.

Limits: the store belongs to one schedule. Changing data.seed, the batch sizes,
data.bucket_*, data.num_epochs / train.num_steps beyond the stored batches, the
data or the tokenizer means recomputing. It pays off when several runs share
that schedule (sweeps over beta, lambda, lr); for a single run it moves the
reference cost out of the step rather than removing it. Losses that need
per-token reference log-probs (offline PPO) cannot use it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding

from kto_jax.batch import has_kl_stream, is_packed, step_keys
from kto_jax.data import packing
from kto_jax.errors import UserError
from kto_jax.losses.registry import HaloLoss, get_loss
from kto_jax.step.stats import reference_keys
from kto_jax.train.batches import to_global

STORE_VERSION = 1
META_FILE = "meta.json"
CHECKSUM = "row_checksum"
SPLITS = ("train", "eval")


# ---------------------------------------------------------------- row checksums (host)

_HASH_CONSTANTS = ((2654435761, 2246822519), (3266489917, 668265263))


def row_checksums(batch: Mapping[str, np.ndarray], pack_groups: int = 1) -> np.ndarray:
    """uint32 [A, M, 2]: two position-weighted hashes of each row's real tokens.

    Covers the prompt and every completion side (completion, or chosen and rejected);
    padding contributes nothing, so it is the same for any padded length, and a packed
    batch (data.packing; `pack_groups`: its local packing groups) of the same examples
    gives the same values (its prompts read back from the rows), so the store is per
    example whatever the layout.
    """
    if is_packed(batch):
        prompt_ids, prompt_mask = packing.packed_prompts(batch, pack_groups)
        batch = dict(batch, prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    sides = ["prompt"] + (["chosen", "rejected"] if "chosen_ids" in batch else ["completion"])
    out = []
    for mult, add in _HASH_CONSTANTS:
        h = np.zeros(np.shape(batch["prompt_ids"])[:2], np.uint32)
        for s, side in enumerate(sides):
            ids = np.asarray(batch[f"{side}_ids"]).astype(np.uint32)
            mask = np.asarray(batch[f"{side}_mask"]).astype(np.uint32)
            # Right-aligned positions for the left-padded prompt, left-aligned for completions.
            n = ids.shape[-1]
            pos = np.arange(n, dtype=np.uint32)
            if side == "prompt":
                pos = (n - 1 - pos).astype(np.uint32)
            weight = (pos * np.uint32(mult) + np.uint32(add + s)) | np.uint32(1)
            with np.errstate(over="ignore"):
                h = h * np.uint32(31) + ((ids + np.uint32(1)) * mask * weight).sum(-1, dtype=np.uint32)
        out.append(h)
    return np.stack(out, -1)


# ---------------------------------------------------------------- the store on disk

def write_store(out_dir: str, meta: dict[str, Any], splits: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Writes meta.json and one .npz per split (atomically: temp file, then rename)."""
    os.makedirs(out_dir, exist_ok=True)
    for split, arrays in splits.items():
        tmp = os.path.join(out_dir, f".{split}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, os.path.join(out_dir, f"{split}.npz"))
    meta = dict(meta, version=STORE_VERSION, splits={
        s: {"num_batches": int(next(iter(a.values())).shape[0])} | meta.get("splits", {}).get(s, {})
        for s, a in splits.items()})
    tmp = os.path.join(out_dir, f".{META_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, META_FILE))


class ReferenceStore:
    """A loaded store: `meta` and, per split, {key: array [N, A, M(, 2)]}."""

    def __init__(self, path: str):
        meta_path = os.path.join(path, META_FILE)
        if not os.path.isfile(meta_path):
            raise UserError(f"data.reference_logps_path={path!r} holds no {META_FILE}: write it with "
                            "`kto-jax precompute-ref --config=... --out=DIR`.")
        with open(meta_path, encoding="utf-8") as f:
            self.meta = json.load(f)
        if self.meta.get("version") != STORE_VERSION:
            raise UserError(f"{meta_path}: store version {self.meta.get('version')} is not "
                            f"{STORE_VERSION}; recompute it with this kto-jax.")
        self.path = path
        self.splits = {}
        for split in self.meta.get("splits", {}):
            with np.load(os.path.join(path, f"{split}.npz")) as z:
                self.splits[split] = {k: z[k] for k in z.files}

    def check_compatible(self, config, loss: HaloLoss, fingerprint: str) -> None:
        """UserError when the store was made for another loss family, batch layout or data."""
        m, problems = self.meta, []
        missing = [k for k in reference_keys(loss) if k not in m.get("keys", ())]
        if missing:
            problems.append(f"it lacks {missing} (made for loss {m.get('loss')!r})")
        sizes = (int(config.train.global_batch_size), int(config.train.micro_batch_size))
        if tuple(m.get("batch", ())) != sizes:
            problems.append(f"it was made for global/micro batch {m.get('batch')}, the run uses {list(sizes)}")
        if m.get("fingerprint") != fingerprint:
            problems.append(f"its data fingerprint {m.get('fingerprint')!r} is not this run's "
                            f"{fingerprint!r} (other data, tokenizer, seed or bucketing)")
        if problems:
            raise UserError(f"precomputed reference log-probs in {self.path}: " + "; ".join(problems)
                            + ". Recompute with `kto-jax precompute-ref` and this run's config.")

    def rows(self, split: str, index: int, batch: Mapping[str, np.ndarray], process_index: int,
             process_count: int, pack_groups: int = 1) -> dict[str, np.ndarray]:
        """This process's [A, M_local] reference arrays for global batch `index`, checked
        (`pack_groups`: the local packing groups of a packed batch)."""
        arrays = self.splits.get(split)
        if arrays is None:
            raise UserError(f"{self.path} has no precomputed {split} batches; rerun "
                            "`kto-jax precompute-ref` with the run's config (eval split included).")
        total = arrays[CHECKSUM].shape[0]
        if index >= total:
            raise UserError(f"{self.path} covers {total} {split} batches but the run reached batch "
                            f"{index}: precompute with the run's train.num_steps / data.num_epochs.")
        m_local = arrays[CHECKSUM].shape[2] // process_count
        lo = process_index * m_local
        if not np.array_equal(arrays[CHECKSUM][index, :, lo:lo + m_local],
                              row_checksums(batch, pack_groups)):
            raise UserError(f"{self.path}: {split} batch {index} holds other examples than the "
                            "store was computed on (data, tokenizer, seed or batch settings "
                            "changed); recompute with `kto-jax precompute-ref`.")
        return {k: v[index, :, lo:lo + m_local] for k, v in arrays.items() if k != CHECKSUM}


# ---------------------------------------------------------------- attaching to the data

class ReferenceLogpsIterator:
    """Wraps a data iterator (kto_jax.data.FeedbackIterator): adds the stored keys to each batch.

    The global batch index is the wrapped iterator's `next_batch`, so a resumed
    iterator (`set_state`) keeps reading the right slots.
    """

    def __init__(self, inner, store: ReferenceStore, split: str, process_index: int,
                 process_count: int):
        self._inner, self._store, self._split = inner, store, split
        self._process = (process_index, process_count)

    def __iter__(self) -> "ReferenceLogpsIterator":
        return self

    def __next__(self) -> dict:
        index = self._inner.next_batch
        batch = next(self._inner)
        return dict(batch, **self._store.rows(self._split, index, batch, *self._process,
                                              getattr(self._inner, "pack_groups", 1)))

    def get_state(self):
        return self._inner.get_state()

    def set_state(self, state) -> None:
        self._inner.set_state(state)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def attach_to_datasets(config, data, process_index: int | None = None,
                       process_count: int | None = None):
    """`data` (kto_jax.data.Datasets) with precomputed reference keys on every batch.

    A no-op unless config.reference.source == "precomputed" and the loss uses a
    reference. Call it right after `build_datasets`.
    """
    loss = get_loss(config.loss.name)
    if config.reference.source != "precomputed" or not loss.uses_reference:
        return data
    path = config.data.reference_logps_path
    if not path:
        raise UserError("config.reference.source='precomputed' needs data.reference_logps_path=DIR, "
                        "written by `kto-jax precompute-ref --config=... --out=DIR`.")
    store = ReferenceStore(path)
    store.check_compatible(config, loss, data.summary.fingerprint)
    proc = (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)

    train = _AttachingFactory(data.train_iter_factory, store, "train", proc)
    evaluation = None if data.eval_batches is None else _AttachingFactory(
        data.eval_batches, store, "eval", proc)
    return type(data)(train, evaluation, data.summary)


class _AttachingFactory:
    """An iterator factory whose iterators carry the stored keys; other attributes pass through."""

    def __init__(self, inner, store: ReferenceStore, split: str, proc: tuple[int, int]):
        self._inner, self._store, self._split, self._proc = inner, store, split, proc

    def __call__(self, *args, **kwargs) -> ReferenceLogpsIterator:
        return ReferenceLogpsIterator(self._inner(*args, **kwargs), self._store, self._split,
                                      *self._proc)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


# ---------------------------------------------------------------- the precompute pass

def _gather_rows(local: np.ndarray) -> np.ndarray:
    """[A, M_local, ...] of every process -> [A, M, ...] in process order (the global layout)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    stacked = np.asarray(multihost_utils.process_allgather(local))  # [P, A, M_local, ...]
    return np.concatenate(list(stacked), axis=1)


def compute_split(batches: Iterator[dict], num_batches: int, fn, reference, sharding: NamedSharding,
                  keys: tuple[str, ...], log: Callable[[str], None], name: str) -> dict[str, np.ndarray]:
    """Runs `fn` over `num_batches` host batches; {key: [N, A, M], row_checksum: [N, A, M, 2]}.

    `fn(reference, batch)` is the jitted reference step (`make_reference_step`). Packed
    batches (data.packing) give the same per-example arrays as padded ones.
    """
    groups = getattr(batches, "pack_groups", 1)
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys + (CHECKSUM,)}
    start = time.perf_counter()
    for k in range(num_batches):
        local = next(batches)
        inputs = {key: v for key, v in local.items()
                  if key in step_keys("chosen_ids" in local, is_packed(local), has_kl_stream(local))}
        result = fn(reference, to_global(inputs, sharding))
        for key in keys:
            out[key].append(np.asarray(result[key], np.float32))
        out[CHECKSUM].append(_gather_rows(row_checksums(local, groups)))
        if (k + 1) % 50 == 0 or k + 1 == num_batches:
            log(f"{name}: {k + 1}/{num_batches} batches, {time.perf_counter() - start:.1f} s")
    return {k: np.stack(v) for k, v in out.items()}
