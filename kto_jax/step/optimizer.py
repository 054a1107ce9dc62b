"""The optax optimizer and learning-rate schedule of a run, built from `config.optim`.

AdamW is the default (the paper trains every method with it, lr 5e-6 for KTO);
RMSProp is the option used for the paper's comparisons. The schedule is a linear
warmup from 0 to the peak rate, then constant or cosine decay to 0 at the last step.
Clipping by global norm comes first in the chain, so the update sees clipped
gradients; the norm before clipping is reported by the train step.
"""

from __future__ import annotations

import dataclasses

import optax

from kto_jax.errors import UserError

OPTIMIZERS = ("adamw", "rmsprop")
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """config.optim, read once (configs/base.py documents each field)."""
    name: str = "adamw"
    lr: float = 5e-6
    schedule: str = "constant"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0


def make_schedule(optim: OptimSettings, num_steps: int) -> optax.Schedule:
    """Linear warmup over `optim.warmup_steps`, then constant or cosine to 0 at `num_steps`.

    Args:
      optim: the run's `OptimSettings` (lr, schedule, warmup_steps).
      num_steps: total optimizer steps of the run; needed by "cosine" only.
    """
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    if lr < 0 or warmup < 0:
        raise UserError(f"config.optim.lr={lr} and config.optim.warmup_steps={warmup} "
                        "must be >= 0.")
    if optim.schedule not in SCHEDULES:
        raise UserError(f"config.optim.schedule={optim.schedule!r} is not one of {SCHEDULES}.")
    if optim.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        decay_steps = int(num_steps) - warmup
        if decay_steps <= 0:
            raise UserError(
                f"config.optim.schedule='cosine' needs more steps ({num_steps}) than "
                f"config.optim.warmup_steps ({warmup}): lower the warmup or set "
                "config.train.num_steps.")
        after = optax.cosine_decay_schedule(lr, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(optim: OptimSettings, num_steps: int = 0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The clipped optimizer of `config.optim` and its learning-rate schedule.

    Args:
      optim: the run's `OptimSettings` (config.optim).
      num_steps: total optimizer steps (cosine schedule only).

    Returns:
      (transformation, schedule): the optax chain and the step -> lr function, so the
      step can log the rate it used.
    """
    if optim.name not in OPTIMIZERS:
        raise UserError(f"config.optim.name={optim.name!r} is not one of {OPTIMIZERS}.")
    schedule = make_schedule(optim, num_steps)
    if optim.name == "adamw":
        opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                          weight_decay=optim.weight_decay)
    else:
        # eps outside the square root, as torch.optim.RMSprop (the authors' code) has it.
        opt = optax.rmsprop(schedule, decay=optim.b2, eps=optim.eps, eps_in_sqrt=False)
    if optim.max_grad_norm < 0:
        raise UserError(f"config.optim.max_grad_norm={optim.max_grad_norm} must be >= 0 "
                        "(0 disables clipping).")
    if optim.max_grad_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(optim.max_grad_norm), opt)
    return opt, schedule
