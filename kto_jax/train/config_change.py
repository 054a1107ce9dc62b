"""A resume must continue the same run: which config changes are allowed between checkpoints.

Resuming with another model, reference, loss (or its hyperparameters), data or
optimizer would continue a run whose checkpoint was computed under other
mathematics, and overwrite WORKDIR/hf with a model no single config describes. Such
a change is an error naming the keys, unless the user opts in with
`--config.train.allow_config_change=True`. Keys that only change how long the run
goes, what it logs, how often it evaluates or checkpoints, and how the same
computation is laid out on devices change freely (FREE_KEYS). So do the data paths:
the same data may move (to a bucket, to its `kto-jax data prepare` directory), and the
data iterator's saved fingerprint (kto_jax/data/iterator.py) still refuses other data,
tokenizer or batching settings on restore.

Every key not listed as free counts as a change of the mathematics, so a field added
later is guarded until someone decides otherwise. Note that with
optim.schedule="cosine" the schedule depends on train.num_steps; changing the step
count of such a run changes its learning rates from the resume on.
"""

from __future__ import annotations

from typing import Any

# Keys (exact) and sections (ending in ".") that may change on a resume.
FREE_KEYS = (
    "train.num_steps", "train.log_every", "train.eval_every", "train.export_at_end",
    "train.export_dtype", "train.allow_config_change", "train.logprob_vocab_chunk",
    "model.remat_policy", "model.attention_impl", "model.preset",
    "data.worker_count", "data.prefetch",
    "data.train_path", "data.eval_path",  # guarded by the data iterator's fingerprint instead
    "checkpoint.", "mesh.",
    "online.rounds", "online.heldout_every", "online.judge_workers", "online.judge_timeout",
    "online.judge_retries",
)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def is_free(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in FREE_KEYS)


def _same(a: Any, b: Any) -> bool:
    """Equality that ignores list/tuple (JSON round trips turn tuples into lists)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def changed_keys(saved: dict, now: dict) -> list[str]:
    """Flattened keys whose values differ between two (nested) configs."""
    saved, now = flatten(saved), flatten(now)
    return sorted(k for k in saved.keys() | now.keys() if not _same(saved.get(k), now.get(k)))


def split_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(keys that change the run's mathematics, keys that change freely)."""
    keys = changed_keys(saved, now)
    return [k for k in keys if not is_free(k)], [k for k in keys if is_free(k)]


def describe(keys: list[str], saved: dict, now: dict) -> str:
    saved, now = flatten(saved), flatten(now)
    return ", ".join(f"{k}: {saved.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in keys)


def check_resume(saved: dict, now: dict, *, allow: bool, where: str) -> str | None:
    """Raises UserError for a change of the mathematics (unless `allow`); else returns a
    warning line naming what changed (None when nothing did)."""
    from kto_jax.errors import UserError  # pylint: disable=import-outside-toplevel
    math, free = split_changes(saved, now)
    if math and not allow:
        raise UserError(
            f"the checkpoint in {where} was trained with other settings that change the run's "
            f"mathematics: {describe(math, saved, now)}. Use a new --workdir for a new run, or "
            "pass --config.train.allow_config_change=True to resume with the new settings anyway.")
    keys = math + free
    if not keys:
        return None
    return "warning: resuming with config changes since the checkpoint: " + describe(keys, saved, now)
