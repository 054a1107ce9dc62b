"""Names of the logged metrics: kto-jax's own, or TRL's (`config.train.metric_names`).

kto-jax names the two classes of the HALO family "desirable" / "undesirable" (the
paper's terms; paired losses log y_w as desirable and y_l as undesirable). TRL's
KTOTrainer and DPOTrainer call them "chosen" / "rejected", and the HF Trainer logs
the learning rate as `learning_rate`. With `metric_names = "trl"`, every row written to
metrics.jsonl, eval_metrics.jsonl and TensorBoard uses the TRL name of each metric in
`TRL_NAMES`; metrics TRL has no name for keep kto-jax's. The values are the same
quantities, and with "trl" they are also averaged as TRL 1.16 averages them over a
logging window (`averaging`): each microbatch's class mean, then the mean over the
microbatches that hold the class (docs/losses.md, "Metric names").
"""

from __future__ import annotations

from typing import Any, Mapping

from kto_jax.errors import UserError

SCHEMES = ("kto_jax", "trl")

# kto-jax name -> TRL 1.16 name (KTOTrainer / DPOTrainer `_compute_loss` and the HF Trainer's log).
TRL_NAMES = {
    "loss": "loss",
    "kl": "kl",
    "rewards/desirable": "rewards/chosen",
    "rewards/undesirable": "rewards/rejected",
    "rewards/margins": "rewards/margins",
    "rewards/accuracies": "rewards/accuracies",
    "logps/desirable": "logps/chosen",
    "logps/undesirable": "logps/rejected",
    "grad_norm": "grad_norm",
    "lr": "learning_rate",
}


def check_scheme(scheme: str) -> None:
    """UserError unless `scheme` is a known value of config.train.metric_names."""
    if scheme not in SCHEMES:
        raise UserError(f"config.train.metric_names={scheme!r} is not one of {', '.join(SCHEMES)}: "
                        "pass --config.train.metric_names=kto_jax or =trl.")


def averaging(scheme: str) -> str:
    """How `summarize_metrics` averages a window under `scheme`: TRL's per-microbatch means
    for "trl", kto-jax's pooled sums / counts for "kto_jax"."""
    check_scheme(scheme)
    return "microbatch" if scheme == "trl" else "pooled"


def rename(metrics: Mapping[str, Any], scheme: str) -> dict[str, Any]:
    """`metrics` with each key under `scheme`'s name (order kept; "kto_jax" leaves them as they are)."""
    check_scheme(scheme)
    if scheme == "kto_jax":
        return dict(metrics)
    return {TRL_NAMES.get(key, key): value for key, value in metrics.items()}
