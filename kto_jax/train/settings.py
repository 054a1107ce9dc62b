"""The run's settings: its config read ONCE, at the boundary between the runtime and the rest.

    settings = read_settings(config)          # typed, frozen, checked
    build_datasets(settings.data, tokenizer)  # kto_jax/data/ reads DataSettings
    make_optimizer(settings.optim, steps)     # kto_jax/step/ reads OptimSettings, StepSettings
    settings = settings.with_lambda_weights(summary.desirable_weight, summary.undesirable_weight)

`read_settings` turns the `ConfigDict` into frozen dataclasses, one per part of the
package that reads them (the model, the data pipeline, the batch, the loss and its
hyperparameters, LoRA, the step, the optimizer, the run's loop and checkpoints), checks every setting they share
once (the batch sizes against the loss; the reference source against the loss; the
reference syncing) and resolves what needs resolving once: LoRA, with lora.init_from's
adapter_config.json read here (the step opens no file), the base's quantisation
(QLoRA: `ModelSettings.quantization`, which the loader takes), and the data's packing groups.
The lambda weights are resolved by the data summary (eq. 9 when config.loss.auto_weights)
and come in through `with_lambda_weights`; the user's config is never rewritten. Below
the runtime nothing reads a ConfigDict (tests/test_architecture.py checks the imports).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kto_jax.batch import BatchSize
from kto_jax.data.settings import CONFIG_FIELDS as DATA_FIELDS
from kto_jax.data.settings import DataSettings
from kto_jax.errors import UserError
from kto_jax.losses.hparams import LossHparams
from kto_jax.losses.registry import HaloLoss, get_loss
from kto_jax.models import lora as lora_lib
from kto_jax.models import lora_io
from kto_jax.models.quantize import NO_QUANTIZATION, SCHEMES, Quantization
from kto_jax.sharding import configured_batch_shards, rules_of
from kto_jax.step.optimizer import OptimSettings
from kto_jax.step.settings import REFERENCE_SOURCES, StepSettings


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """config.model: where the policy comes from and how it computes."""
    path: str = ""
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    remat_policy: str = "none"
    attention_impl: str = "auto"
    preset: str = ""
    quantization: Quantization = NO_QUANTIZATION  # config.lora.base_quantization / double_quant (QLoRA)
    router_aux_loss_coef: float = -1.0  # a mixture of experts' load-balancing loss weight; < 0: the checkpoint's

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments `kto_jax.models.from_pretrained` takes besides the path."""
        own = {} if self.router_aux_loss_coef < 0 else {"router_aux_loss_coef": float(self.router_aux_loss_coef)}
        return dict(param_dtype=self.param_dtype, dtype=self.dtype, remat_policy=self.remat_policy,
                    attention_impl=self.attention_impl, quantization=self.quantization, **own)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The run's loop: config.train's steps, logging, evaluation and export, and
    config.checkpoint (configs/base.py documents each field)."""
    num_steps: int = 0             # 0: data.num_epochs over the training set
    log_every: int = 10
    eval_every: int = 100
    metric_names: str = "kto_jax"
    export_at_end: bool = True
    export_dtype: str = ""
    allow_config_change: bool = False
    checkpoint_every: int = 100    # config.checkpoint.every_steps
    checkpoint_keep: int = 3       # config.checkpoint.keep
    async_save: bool = True        # config.checkpoint.async_save


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The parts of a run's config that the libraries and the step read, typed and checked."""
    model: ModelSettings
    loss: HaloLoss
    batch: BatchSize
    lora: lora_lib.LoraConfig | None   # resolved; None: every parameter trains
    step: StepSettings
    optim: OptimSettings
    data: DataSettings
    rules: tuple[tuple[str, Any], ...]  # config.mesh.rules
    train: TrainSettings

    def with_lambda_weights(self, desirable_weight: float, undesirable_weight: float
                            ) -> RunSettings:
        """These settings with the run's resolved (lambda_D, lambda_U) (the data summary's)."""
        return dataclasses.replace(
            self, step=self.step.with_lambda_weights(desirable_weight, undesirable_weight))


def read_settings(config: Any, *, device_count: int | None = None) -> RunSettings:
    """The run's settings of `config` (a ConfigDict), checked; see the module docstring.

    `device_count` (default: jax.device_count()) sizes the packing groups of a packed run.
    Raises UserError naming the first setting that is wrong.
    """
    loss = get_loss(config.loss.name)
    batch = BatchSize(int(config.train.global_batch_size), int(config.train.micro_batch_size))
    batch.check(z0_loss=loss.name if loss.uses_kl else None)
    check_reference(config, loss)
    lora = resolve_lora(config, loss)
    rules = rules_of(config.mesh)
    step = StepSettings(
        loss=loss, hparams=LossHparams(config.loss.to_dict()),
        reference_source=config.reference.source,
        vocab_chunk=int(config.train.logprob_vocab_chunk),
        reference_sync=reference_sync(config, loss), batch=batch, rules=rules,
        reference_dtype=config.reference.param_dtype, lora=lora,
        seed=int(config.train.get("seed", 0)))
    model = dataclasses.replace(_section(ModelSettings, config.model), quantization=base_quantization(config))
    return RunSettings(model=model, loss=loss, batch=batch,
                       lora=lora, step=step, optim=_section(OptimSettings, config.optim),
                       data=data_settings(config, loss, batch, device_count), rules=rules,
                       train=train_settings(config))


def train_settings(config: Any) -> TrainSettings:
    """config.train's loop fields and config.checkpoint, typed."""
    t, ck = config.train, config.checkpoint
    return TrainSettings(
        num_steps=int(t.num_steps), log_every=int(t.log_every), eval_every=int(t.eval_every),
        metric_names=t.metric_names, export_at_end=bool(t.export_at_end),
        export_dtype=t.get("export_dtype", "") or "",
        allow_config_change=bool(t.get("allow_config_change", False)),
        checkpoint_every=int(ck.every_steps), checkpoint_keep=int(ck.keep),
        async_save=bool(ck.async_save))


def _section(cls, section: Any):
    """A settings dataclass from a config section's fields of the same names (the others
    keep their defaults: a config saved by an older kto-jax may lack a newer field)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in section.to_dict().items() if k in names})


def data_settings(config: Any, loss: HaloLoss, batch: BatchSize,
                  device_count: int | None = None) -> DataSettings:
    """config.data with what the pipeline must know of the loss, the batch and the mesh."""
    d = config.data
    pack_groups = 1
    if d.get("packing", False) is True:
        if device_count is None:
            import jax  # pylint: disable=import-outside-toplevel
            device_count = jax.device_count()
        pack_groups = configured_batch_shards(config.mesh, device_count)
    fields = {k: d[k] for k in DATA_FIELDS if k in d}
    fields["bucket_lengths"] = tuple(fields.get("bucket_lengths", ()))
    return DataSettings(
        batch=batch, loss_name=loss.name, paired=loss.paired,
        pack_second=loss.paired or loss.uses_kl, uses_lambda_weights=loss.uses_lambda_weights,
        auto_weights=bool(config.loss.get("auto_weights", False)),
        desirable_weight=config.loss.desirable_weight,
        undesirable_weight=config.loss.undesirable_weight, pack_groups=pack_groups, **fields)


def read_data_settings(config: Any, *, device_count: int | None = None) -> DataSettings:
    """The data part of `read_settings(config)` alone (`kto-jax data inspect|prepare`: the
    data pipeline's own checks, not the step's)."""
    loss = get_loss(config.loss.name)
    batch = BatchSize(int(config.train.global_batch_size), int(config.train.micro_batch_size))
    return data_settings(config, loss, batch, device_count)


def step_settings(config: Any) -> StepSettings:
    """`read_settings(config).step`: the step's settings with the config's own lambda weights."""
    return read_settings(config).step


def check_reference(config: Any, loss: HaloLoss) -> None:
    """UserError for a reference source the chosen loss cannot train with."""
    source = config.reference.source
    if source not in REFERENCE_SOURCES:
        raise UserError(f"config.reference.source={source!r} is not one of {REFERENCE_SOURCES}.")
    if loss.uses_reference and source == "none":
        raise UserError(f"loss {loss.name!r} needs a reference model: set "
                        "config.reference.source to 'model' or 'precomputed'.")
    if loss.uses_token_logps and source == "precomputed":
        raise UserError(f"loss {loss.name!r} needs per-token reference log-probs, which the data "
                        "cannot carry: set config.reference.source='model'.")
    check_reference_sync(config, loss)


def reference_sync(config: Any, loss: HaloLoss) -> tuple[int, float] | None:
    """(tau, alpha) of the run's reference syncing, or None (a fixed reference).

    config.reference.sync_every > 0 sets tau (and sync_alpha alpha); 0 leaves the loss's own
    default (`HaloLoss.reference_sync`: humanline syncs every step with alpha = 1, as HALOs).
    """
    every = int(config.reference.get("sync_every", 0))
    if every > 0:
        return every, float(config.reference.get("sync_alpha", 0.6))
    return loss.reference_sync


def check_reference_sync(config: Any, loss: HaloLoss) -> None:
    """UserError for reference syncing the run cannot do (docs/losses.md, "Reference syncing")."""
    every, alpha = int(config.reference.get("sync_every", 0)), float(config.reference.get("sync_alpha", 0.6))
    if every < 0:
        raise UserError(f"config.reference.sync_every={every} must be >= 0 (0: never sync).")
    if every > 0 and not 0.0 < alpha <= 1.0:
        raise UserError(f"config.reference.sync_alpha={alpha} must lie in (0, 1]: the weight of "
                        "the policy in pi_ref <- alpha pi_theta + (1 - alpha) pi_ref.")
    sync = reference_sync(config, loss)
    if sync is None:
        return
    why = (f"config.reference.sync_every={every}" if every > 0 else
           f"loss {loss.name!r} (which syncs its reference every {sync[0]} step(s))")
    if not loss.uses_reference:
        raise UserError(f"{why}: loss {loss.name!r} has no reference model to sync; set "
                        "--config.reference.sync_every=0.")
    if config.reference.source == "precomputed":
        raise UserError(f"{why} moves pi_ref towards the policy during training, which stored "
                        "reference log-probs cannot follow: set config.reference.source='model'"
                        + (" or --config.reference.sync_every=0." if every > 0 else "."))
    rank = configured_lora(config).rank
    if rank > 0:
        raise UserError(f"{why} with LoRA (config.lora.rank={rank}): blending the "
                        "adapters' A and B factors is not a blend of the weights, so kto-jax does "
                        "not sync a LoRA reference. Train all parameters (lora.rank=0) to sync"
                        + (", or set --config.reference.sync_every=0." if every > 0 else "."))


def base_quantization(config: Any) -> Quantization:
    """config.lora.base_quantization and double_quant: how a LoRA run stores its frozen base
    (QLoRA, docs/lora.md). UserError for an unknown scheme, and for a quantised base without
    LoRA (every weight would train, and integer codes have no gradient)."""
    section = config.get("lora", None)
    get = section.get if section else (lambda key, default: default)
    scheme = str(get("base_quantization", "none") or "none")
    double = bool(get("double_quant", False))
    if scheme not in ("none", *SCHEMES):
        raise UserError(f"config.lora.base_quantization={scheme!r}: choose none, {', '.join(SCHEMES)}")
    if double and scheme != "nf4":
        raise UserError(f"config.lora.double_quant=True quantises NF4's block scales, and "
                        f"config.lora.base_quantization={scheme!r} has none: set "
                        "--config.lora.base_quantization=nf4 or --config.lora.double_quant=False")
    quantization = Quantization(scheme, double)
    if quantization.enabled and not configured_lora(config).enabled:
        raise UserError(f"config.lora.base_quantization={scheme!r} stores the frozen base of a LoRA run "
                        "quantised (QLoRA), and LoRA is off (config.lora.rank=0): every weight would "
                        "train. Set --config.lora.rank=16 (or another rank) for QLoRA, or "
                        "--config.lora.base_quantization=none to train every weight")
    return quantization


def configured_lora(config: Any) -> lora_lib.LoraConfig:
    """config.lora as given (off when the config has no lora section), before resolution."""
    section = config.get("lora", None)
    return lora_lib.LoraConfig.from_config(section.to_dict() if section else {})


def resolved_lora(config: Any, model_config: Any, loss: HaloLoss) -> lora_lib.LoraConfig | None:
    """`resolve_lora`, then checked against `model_config`'s architecture (the target modules
    it has), as a run does once its model is known."""
    lora = resolve_lora(config, loss)
    if lora is not None:
        lora_lib.validate(lora, model_config, loss)
    return lora


def resolve_lora(config: Any, loss: HaloLoss) -> lora_lib.LoraConfig | None:
    """config.lora checked against the loss (UserError naming the setting, before anything
    loads or compiles), with rank/alpha/targets from lora.init_from's adapter_config.json
    when set; None when LoRA is off. Checked against the model once it is known
    (`kto_jax.models.lora.validate` with its config)."""
    lora = configured_lora(config)
    if not lora.enabled:
        return None
    lora_lib.validate(lora, None, loss)
    if lora.init_from and config.reference.source == "precomputed" and loss.uses_reference:
        raise UserError(f"config.lora.init_from={lora.init_from!r} with config.reference.source="
                        "'precomputed': the reference is base + that adapter, which stored "
                        "log-probs of the base do not give; set config.reference.source='model'")
    if lora.init_from:
        lora = lora_io.read_peft_config(lora.init_from, lora)
        lora_lib.validate(lora, None, loss)
    return lora
