"""The one loss interface of the train step: `get_loss(config.loss.name) -> HaloLoss`.

Contract between the losses and the step (kto_jax/step/train_step.py)
----------------------------------------------------------------------
A `HaloLoss` says what the step must compute and how to call the loss:

  name               config.loss.name
  paired             True: paired batch layout (chosen/rejected arrays, kto_jax/batch.py);
                     False: unpaired layout (completion + desirable).
  uses_reference     the step provides reference log-probs (frozen model or precomputed).
  uses_kl            the step runs the KL forwards on the mismatched pairs
                     (x_i, y_{i+1 mod M}) = completion arrays rolled by one within the
                     microbatch, for the policy (stop_gradient on params) and the reference.
  uses_token_logps   the step provides per-token log-probs [M, C] (offline PPO, humanline;
                     humanline also reads those of the KL pairs).
  value_head         None, or a `ValueHead`: the train state holds its params
                     (`value_head.init(key, hidden_size)`, trained with the policy by one
                     optimizer) and the step provides `values` [M, C] =
                     `value_head.apply(params, hidden)` on the policy's final hidden states
                     (offline PPO's critic). `uses_value_head` says whether there is one.
  uses_lambda_weights  the loss weighs desirable / undesirable examples by lambda_D /
                     lambda_U (eq. 8), so eq. 9's advice and loss.auto_weights apply to it.
  stat_keys          the keys of `stats` this loss reads (a subset of the lists below).
  loss_state         None, or ((key, initial value), ...): a small state the loss carries across
                     microbatches and steps (`bco`: the running reward mean and its count).
                     The train state keeps it (checkpointed); the step puts each entry into
                     `stats` under its own key before calling the loss and, in training
                     only, replaces it by `update_loss_state(state, metrics)` after each
                     microbatch (so microbatch a+1 sees the state after microbatch a).
                     The eval step passes the state unchanged with stats["frozen_loss_state"]
                     = True (a Python bool).
  reference_sync     None, or the (sync_every, sync_alpha) the loss trains with when
                     config.reference.sync_every is 0 (`humanline`: (1, 1.0), HALOs' copy
                     of the policy into the reference at every step).
  window_warnings    functions of a logged window's summarised metrics -> a warning line or
                     None; the trainer logs the first warning once per run (the losses with
                     z0 warn about microbatches without KL pairs: `kto.z0_warning`).

Adding a loss: its module (pure functions on arrays, returning (loss, additive metrics)),
one entry in `_LOSS_LIST` below (an adapter from `stats` and `hparams` to it, and what it
needs), its hyperparameters with their defaults in configs/base.py (`config.loss.*`),
its tests (tests/losses/) and its section in docs/losses.md. Nothing outside losses/
names a loss: the step, the trainer and the runtime ask the `HaloLoss` (the fields
above) what to compute, keep and warn about.

`loss(stats, hparams) -> (loss, metrics)` with `hparams` the run's config.loss (a mapping
read by attribute, `hparams.beta`; the step passes `StepSettings.hparams`)
and `stats` a dict of arrays for ONE microbatch (shape [M] unless noted), float32
log-probs summed over completion tokens:

  unpaired: policy_logps, policy_token_counts, reference_logps, policy_kl_logps,
            reference_kl_logps, desirable (bool), weight, valid (bool),
            kl_valid (bool, optional: valid & rolled valid, i.e. both rows of the KL
            pair are real; default valid)
  paired:   policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
            reference_rejected_logps, chosen_token_counts, rejected_token_counts, valid
  PPO:      the unpaired keys plus policy_token_logps [M, C], reference_token_logps
            [M, C], completion_mask [M, C], values [M, C] (values[:, t] = V of the state
            before completion token t; right-padded like the completion).
  humanline: policy_token_logps, reference_token_logps, completion_mask and the same for
            the KL pairs: policy_kl_token_logps, reference_kl_token_logps,
            kl_completion_mask [M, C] (completion y_{i+1 mod M}), plus desirable, weight,
            valid (kl_valid optional).
  loss state: one entry per key of `loss_state` (bco: bco_delta float32, bco_count int32).

`HaloLoss.__call__` adds the microbatch's per-microbatch means to `metrics`
(`kto_jax.losses.common.microbatch_means`, for TRL's way of averaging logs).

`loss` is a mean over this microbatch: loss == metrics["loss_sum"] / max(metrics["loss_denominator"], 1).
`metrics` holds only additive float32 scalars (sums and counts, see
kto_jax.losses.common), always including `loss_sum`, `loss_denominator` and
`num_examples` (valid examples, or pairs). `loss_denominator` equals `num_examples`
for every sequence-level loss and is the valid completion-token count for the
token-mean losses (sft, csft, ppo_offline). Gradient accumulation is exact when the
step weights microbatch i by its denominator: total = sum_i loss_i * d_i / sum_i d_i
with d_i = metrics_i["loss_denominator"]. Sum metrics over microbatches, steps and
hosts, then call `summarize_metrics`.

`config.loss.auto_weights` is resolved before the step, from the training set's
class counts (the data summary's eq. 9 weights, which the step's settings carry:
kto_jax/step/settings.py); losses read only desirable_weight / undesirable_weight.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax

from kto_jax.errors import UserError
from kto_jax.losses import bco, kto, ppo, preference, sft
from kto_jax.losses.common import microbatch_means

Array = jax.Array
Stats = Mapping[str, Array]
Hparams = Any   # config.loss as a mapping read by attribute (`LossHparams`)
LossFn = Callable[[Stats, Hparams], tuple[Array, dict]]
StateUpdate = Callable[[Mapping[str, Array], Mapping[str, Array]], dict]
WindowWarning = Callable[[Mapping[str, Any]], Optional[str]]
DEFAULT_LOSS = "kto"   # configs/base.py's loss.name, and the scorer of implied rewards (`reward_loss`)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValueHead:
    """A head the loss trains beside the policy on its detached final hidden states.

    init(key, hidden_size) -> params; apply(params, hidden [..., T, H]) -> values [..., T].
    `beside_lora`: it can be trained in full next to LoRA adapters (it is not a base weight).
    """
    init: Callable[[Array, int], Any]
    apply: Callable[[Any, Array], Array]
    name: str = "value_head"
    beside_lora: bool = True

UNPAIRED_SEQ = ("policy_logps", "reference_logps", "desirable", "weight", "valid")
KL_KEYS = ("policy_kl_logps", "reference_kl_logps")
PAIRED_REF = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
              "reference_rejected_logps", "valid")
PAIRED_FREE = ("policy_chosen_logps", "policy_rejected_logps", "valid")
COUNTS = ("chosen_token_counts", "rejected_token_counts")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HaloLoss:
    """A named loss with what the step must feed it (see the module docstring)."""
    name: str
    fn: LossFn
    paired: bool
    uses_reference: bool
    uses_kl: bool
    stat_keys: tuple[str, ...]
    uses_token_logps: bool = False
    value_head: Optional[ValueHead] = None
    uses_lambda_weights: bool = False
    loss_state: Optional[tuple[tuple[str, Any], ...]] = None
    update_loss_state: Optional[StateUpdate] = None
    reference_sync: Optional[tuple[int, float]] = None
    window_warnings: tuple[WindowWarning, ...] = ()

    @property
    def uses_value_head(self) -> bool:
        return self.value_head is not None

    def window_warning(self, record: Mapping[str, Any]) -> Optional[str]:
        """The first of `window_warnings` that has something to say about a logged window."""
        return next((w for w in (f(record) for f in self.window_warnings) if w), None)

    def __call__(self, stats: Stats, hparams: Hparams) -> tuple[Array, dict]:
        missing = [k for k in self.stat_keys + tuple(k for k, _ in self.loss_state or ()) if k not in stats]
        if missing:
            raise KeyError(f"loss {self.name!r} needs stats {missing}; got {sorted(stats)}")
        loss, metrics = self.fn(stats, hparams)
        return loss, microbatch_means(metrics)

    def initial_loss_state(self) -> dict[str, Any]:
        """The loss state a fresh run starts from ({} for a loss without one)."""
        return dict(self.loss_state or ())


def _kl_mask(s: Stats) -> Array:
    return s.get("kl_valid", s["valid"])


def _kto_kwargs(s: Stats, h) -> dict:
    return dict(beta=h.beta, desirable_weight=h.desirable_weight,
                undesirable_weight=h.undesirable_weight, mask=s["valid"], weight=s["weight"],
                dynamic_desirable_weight=h.get("dynamic_desirable_weight", 0.0))


def _kto_value(value: kto.Value):
    """The registry adapter of `kto.kto_value_loss` with value function `value`."""
    def call(s: Stats, h) -> tuple[Array, dict]:
        return kto.kto_value_loss(value, s["policy_logps"], s["reference_logps"],
                                  s["policy_kl_logps"], s["reference_kl_logps"], s["desirable"],
                                  kl_mask=_kl_mask(s), **_kto_kwargs(s, h))
    return call


def _kto_no_z0(s: Stats, h):
    return kto.kto_no_z0_loss(s["policy_logps"], s["reference_logps"], s["desirable"], **_kto_kwargs(s, h))


def _apo_zero_unpaired(s: Stats, h):
    kw = _kto_kwargs(s, h)
    kw.pop("dynamic_desirable_weight")
    return kto.apo_zero_unpaired_loss(s["policy_logps"], s["reference_logps"], s["desirable"], **kw)


def _kto_reference_free(s: Stats, h):
    return kto.kto_reference_free_loss(s["policy_logps"], s["policy_kl_logps"], s["desirable"],
                                       kl_mask=_kl_mask(s), **_kto_kwargs(s, h))


def _humanline(s: Stats, h):
    low, high = float(h.humanline_log_eps_p), float(h.humanline_log_eps_r)
    if not low < 0.0 < high:
        raise UserError(f"config.loss.humanline_log_eps_p={low} and humanline_log_eps_r={high}: "
                        "humanline clamps each token's log-ratio to [log eps_P, log eps_R], which "
                        "must contain 0 (HALOs' defaults: -1.0 and 1.5).")
    return kto.humanline_loss(s["policy_token_logps"], s["reference_token_logps"],
                              s["completion_mask"], s["policy_kl_token_logps"],
                              s["reference_kl_token_logps"], s["kl_completion_mask"], s["desirable"],
                              log_eps_p=low, log_eps_r=high, kl_mask=_kl_mask(s), **_kto_kwargs(s, h))


def _bco(s: Stats, h):
    return bco.bco_loss(s["policy_logps"], s["reference_logps"], s["desirable"],
                        running_mean=s["bco_delta"], running_count=s["bco_count"], beta=h.beta,
                        mask=s["valid"], weight=s["weight"],
                        frozen=bool(s.get("frozen_loss_state", False)))


def _dpo(s: Stats, h):
    return preference.dpo_loss(s["policy_chosen_logps"], s["policy_rejected_logps"],
                               s["reference_chosen_logps"], s["reference_rejected_logps"],
                               beta=h.beta, label_smoothing=h.label_smoothing, mask=s["valid"])


def _paired_ref(fn, **hparams):
    """Adapter for a paired loss on the four log-prob arrays; `hparams` maps kwarg -> config.loss field."""
    def call(s: Stats, h) -> tuple[Array, dict]:
        return fn(s["policy_chosen_logps"], s["policy_rejected_logps"], s["reference_chosen_logps"],
                  s["reference_rejected_logps"], mask=s["valid"],
                  **{kw: h[field] for kw, field in hparams.items()})
    return call


def _ipo(s: Stats, h):
    return preference.ipo_loss(s["policy_chosen_logps"], s["policy_rejected_logps"],
                               s["reference_chosen_logps"], s["reference_rejected_logps"],
                               s["chosen_token_counts"], s["rejected_token_counts"],
                               tau=h.ipo_tau, mask=s["valid"])


def _simpo(s: Stats, h):
    return preference.simpo_loss(s["policy_chosen_logps"], s["policy_rejected_logps"],
                                 s["chosen_token_counts"], s["rejected_token_counts"],
                                 beta=h.beta, gamma=h.simpo_gamma, mask=s["valid"])


def _orpo(s: Stats, h):
    return preference.orpo_loss(s["policy_chosen_logps"], s["policy_rejected_logps"],
                                s["chosen_token_counts"], s["rejected_token_counts"],
                                lam=h.orpo_lambda, mask=s["valid"])


def _slic(s: Stats, h):
    return preference.slic_loss(s["policy_chosen_logps"], s["policy_rejected_logps"],
                                delta=h.slic_delta, lambda_reg=h.slic_lambda_reg, mask=s["valid"])


def _sft(s: Stats, h):
    return sft.sft_desirable_loss(s["policy_logps"], s["policy_token_counts"], s["desirable"],
                                  mask=s["valid"])


def _csft(s: Stats, h):
    return sft.csft_loss(s["policy_logps"], s["policy_token_counts"], s["desirable"], mask=s["valid"])


def _ppo_offline(s: Stats, h):
    return ppo.ppo_offline_loss(s["policy_token_logps"], s["reference_token_logps"], s["values"],
                                s["completion_mask"], s["desirable"], clip_low=h.ppo_clip_low,
                                clip_high=h.ppo_clip_high, kl_coef=h.ppo_kl_coef,
                                critic_coef=h.ppo_critic_coef, gamma=h.ppo_gamma, lam=h.ppo_lam,
                                mask=s["valid"])


_SFT_KEYS = ("policy_logps", "policy_token_counts", "desirable", "valid")
_HUMANLINE_KEYS = ("policy_token_logps", "reference_token_logps", "completion_mask",
                   "policy_kl_token_logps", "reference_kl_token_logps", "kl_completion_mask",
                   "desirable", "weight", "valid")
_PPO_KEYS = ("policy_token_logps", "reference_token_logps", "completion_mask", "values",
             "desirable", "valid")

def _kto_family(name: str, fn: LossFn, *, uses_reference: bool = True, uses_kl: bool = True,
                stat_keys: tuple[str, ...] = UNPAIRED_SEQ + KL_KEYS) -> HaloLoss:
    """An unpaired loss weighing its classes by lambda_D / lambda_U (`_kto_kwargs`); with
    the KL pairs it estimates z0 and warns about microbatches that have none."""
    return HaloLoss(name=name, fn=fn, paired=False, uses_reference=uses_reference,
                    uses_kl=uses_kl, stat_keys=stat_keys, uses_lambda_weights=True,
                    window_warnings=(kto.z0_warning,) if uses_kl else ())


def _paired(name: str, fn: LossFn, *, uses_reference: bool, stat_keys: tuple[str, ...]) -> HaloLoss:
    return HaloLoss(name=name, fn=fn, paired=True, uses_reference=uses_reference, uses_kl=False,
                    stat_keys=stat_keys)


_LOSS_LIST = (
    _kto_family("kto", _kto_value(kto.LOGISTIC)),
    _kto_family("kto_no_z0", _kto_no_z0, uses_kl=False, stat_keys=UNPAIRED_SEQ),
    _kto_family("kto_concave", _kto_value(kto.CONCAVE)),
    _kto_family("kto_risk_neutral", _kto_value(kto.LINEAR)),
    _kto_family("kto_reference_free", _kto_reference_free, uses_reference=False,
                stat_keys=("policy_logps", "policy_kl_logps", "desirable", "weight", "valid")),
    _kto_family("apo_zero_unpaired", _apo_zero_unpaired, uses_kl=False, stat_keys=UNPAIRED_SEQ),
    HaloLoss(name="humanline", fn=_humanline, paired=False, uses_reference=True, uses_kl=True,
             stat_keys=_HUMANLINE_KEYS, uses_token_logps=True, uses_lambda_weights=True,
             reference_sync=(1, 1.0), window_warnings=(kto.z0_warning,)),
    HaloLoss(name="bco", fn=_bco, paired=False, uses_reference=True, uses_kl=False,
             stat_keys=UNPAIRED_SEQ, loss_state=bco.BCO_STATE,
             update_loss_state=bco.update_bco_state),
    _paired("dpo", _dpo, uses_reference=True, stat_keys=PAIRED_REF),
    _paired("ipo", _ipo, uses_reference=True, stat_keys=PAIRED_REF + COUNTS),
    _paired("orpo", _orpo, uses_reference=False, stat_keys=PAIRED_FREE + COUNTS),
    _paired("simpo", _simpo, uses_reference=False, stat_keys=PAIRED_FREE + COUNTS),
    _paired("slic", _slic, uses_reference=False, stat_keys=PAIRED_FREE),
    _paired("discopop", _paired_ref(preference.discopop_loss, beta="beta", tau="discopop_tau"),
            uses_reference=True, stat_keys=PAIRED_REF),
    _paired("apo_zero", _paired_ref(preference.apo_zero_loss, beta="beta"), uses_reference=True,
            stat_keys=PAIRED_REF),
    _paired("apo_down", _paired_ref(preference.apo_down_loss, beta="beta"), uses_reference=True,
            stat_keys=PAIRED_REF),
    HaloLoss(name="sft", fn=_sft, paired=False, uses_reference=False, uses_kl=False,
             stat_keys=_SFT_KEYS),
    HaloLoss(name="csft", fn=_csft, paired=False, uses_reference=False, uses_kl=False,
             stat_keys=_SFT_KEYS),
    HaloLoss(name="ppo_offline", fn=_ppo_offline, paired=False, uses_reference=True, uses_kl=False,
             stat_keys=_PPO_KEYS, uses_token_logps=True,
             value_head=ValueHead(init=ppo.init_value_head, apply=ppo.value_head_apply)),
)
_LOSSES = {loss.name: loss for loss in _LOSS_LIST}

LOSS_NAMES = tuple(_LOSSES)


def get_loss(name: str) -> HaloLoss:
    """The registered loss called `name` (config.loss.name)."""
    if name not in _LOSSES:
        raise UserError(f"unknown loss {name!r} in --config.loss.name; choose one of: {', '.join(LOSS_NAMES)}")
    return _LOSSES[name]


def reward_loss(loss: HaloLoss) -> HaloLoss:
    """The loss whose statistics score `loss`'s runs' implied rewards (`kto-jax eval`): itself
    when it compares the policy with a reference and has no value head; otherwise
    DEFAULT_LOSS (KTO's statistics, which every reference-free or value-head run lacks)."""
    if loss.uses_reference and not loss.uses_value_head:
        return loss
    return _LOSSES[DEFAULT_LOSS]
