"""Setting up a run: data, mesh, model, train state, steps, checkpoints, logging.

`setup_run(config, workdir)` does everything before the first step and returns a
`Run`. A workdir that holds a checkpoint resumes: the train state is restored
onto its target shardings, the data iterator moves to the next unseen batch and
the metrics window picks up where it was saved, so the rest of the run is the
same computation as if it had never stopped.

`assemble_run` is the part every run shares, in one order: mesh, optimizer,
checkpointer (and the resume check), policy, train state (or the restored one), logger,
run files, jitted steps. `kto-jax train` calls it with the run's data; online rounds
(kto_jax/online/runner.py) call it with none and feed each round's data to the same
step loop (kto_jax/train/loop.py) and evaluation (kto_jax/train/evaluate.py).

Order matters for memory: the policy is read from the HF checkpoint straight onto
the mesh (`kto_jax.models.from_pretrained`), the frozen reference is a copy of it
(config.reference) or, under LoRA (config.lora), the same arrays with the adapters off
(kto_jax/step/adapters.py: no copy, only the adapters trained and checkpointed), and on a resume the fresh policy and optimizer buffers are
dropped before the checkpoint's are read, so at most one train state is alive.

The config is read once (`kto_jax/train/settings.py`, `read_settings`) into the typed
`Run.settings` the data pipeline and the step take. It is never rewritten: the lambda
weights the run trains with (eq. 9's when config.loss.auto_weights) live in
`Run.settings.step`, and the config recorded in the workdir and the checkpoints
(`Run.config_json`) carries them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from kto_jax import hub
from kto_jax import sharding as shd
from kto_jax.config import config_to_json
from kto_jax.data.pipeline import Datasets, build_datasets
from kto_jax.errors import UserError
from kto_jax.models import ModelConfig, abstract_model, from_pretrained, load_tokenizer
from kto_jax.models import lora as lora_lib
from kto_jax.models import lora_io
from kto_jax.models.hf_io import read_hf_config
from kto_jax.models.quantize import Quantization
from kto_jax.step import flops as flops_lib
from kto_jax.step import train_step as step_lib
from kto_jax.step.optimizer import make_optimizer
from kto_jax.step.state import (TrainState, batch_sharding, init_sharded_state, reference_copy,
                                split_lora, split_model)
from kto_jax import fs as paths
from kto_jax.train import config_change, reference_store, workdir as layout
from kto_jax.train.checkpoint import Checkpointer, abstract_like
from kto_jax.train.export import write_model_source
from kto_jax.train.metric_names import check_scheme
from kto_jax.train.metrics import MetricsLogger, truncate_after
from kto_jax.train.settings import RunSettings, read_settings


@dataclasses.dataclass
class Run:
    """Everything the step loop, evaluation and the final export need.

    `data` and `train_iter` are the run's data (`kto-jax train`), or the current round's
    (online rounds set them per round; None between rounds)."""
    config: ml_collections.ConfigDict
    config_json: str             # the config the run trains with (settings' lambda weights)
    settings: RunSettings        # read once from `config`; the step's with the run's lambda weights
    workdir: str
    mesh: jax.sharding.Mesh
    model_config: ModelConfig
    tokenizer: Any
    graphdef: Any
    state: TrainState
    train_step: Callable
    eval_step: Callable
    batch_sharding: jax.sharding.NamedSharding
    data: Datasets | None
    train_iter: Any
    num_steps: int
    start_step: int
    window: dict | None          # saved metrics window (host floats) to continue, or None
    checkpointer: Checkpointer
    logger: MetricsLogger
    flop_dims: flops_lib.ModelDims
    peak_flops: float | None
    shardings: TrainState        # where each array of `state` lives
    resuming: bool               # the state was restored from a checkpoint
    changes: str | None          # what a resume changed in the config (a warning), or None
    warned: bool = False         # a window warning was logged (each run warns once)

    @property
    def is_complete(self) -> bool:
        return self.start_step >= self.num_steps

    def close(self) -> None:
        """Closes the checkpointer (waiting for a save in flight), the logs and the data."""
        self.checkpointer.close()
        self.logger.close()
        if self.train_iter is not None:
            self.train_iter.close()


def check_model_path(config: ml_collections.ConfigDict) -> None:
    """UserError for a missing or unreadable config.model.path, before anything heavy starts
    (`kto-jax train`, `precompute-ref` and `online` all call it)."""
    if not config.model.path:
        raise UserError("config.model.path is empty: pass --config.model.path=DIR (a Hugging Face "
                        "checkpoint directory or hub id) or a llama.cpp .gguf file.")
    if paths.is_remote(config.model.path) and not paths.exists(config.model.path):
        raise UserError(f"config.model.path={config.model.path!r} does not exist.")
    local = hub.local_model_path(config.model.path, what="config.model.path")  # a hub id too
    if os.path.isdir(local) or not local.endswith(".gguf"):
        read_hf_config(local)  # "no config.json in DIR" before any tokenizer error


def check_paths(config: ml_collections.ConfigDict) -> None:
    """UserError for a missing model or data path, before anything heavy starts."""
    check_model_path(config)
    if not config.data.train_path:
        raise UserError("config.data.train_path is empty: pass --config.data.train_path=FILE "
                        "(JSONL / JSON / Parquet, or a datasets directory).")


def prepare_data(config: ml_collections.ConfigDict, settings: RunSettings, tokenizer: Any
                 ) -> tuple[Datasets, int]:
    """The datasets and the step count; `data.summary` holds the lambda weights to train with."""
    data = build_datasets(settings.data, tokenizer)
    # reference.source="precomputed": every batch gets its stored reference log-probs.
    data = reference_store.attach_to_datasets(config, data)
    num_steps = settings.train.num_steps
    if num_steps <= 0:
        num_steps = data.summary.train.batches_per_epoch * int(settings.data.num_epochs)
    if num_steps <= 0:
        raise UserError("the training split gives no full batch: lower "
                        "config.train.global_batch_size or add data.")
    return data, num_steps


def load_policy(settings: RunSettings, mesh) -> tuple[Any, ModelConfig]:
    """The policy from config.model.path, each tensor placed on its sharding."""
    return from_pretrained(settings.model.path, mesh=mesh, rules=settings.rules,
                           **settings.model.load_options())


def with_data_weights(settings: RunSettings, data: Datasets) -> RunSettings:
    """The settings with the lambda weights of the data summary (eq. 9 if auto_weights)."""
    return settings.with_lambda_weights(data.summary.desirable_weight,
                                        data.summary.undesirable_weight)


def initial_state(settings: RunSettings, model, tx, mesh, *, adapter_reference: bool = False
                  ) -> tuple[Any, TrainState, Any]:
    """(graphdef, state on its shardings, shardings) of a fresh run: the loaded policy's
    buffers become the state's params (`init_sharded_state`, donated). Under LoRA they
    become the frozen base and the params are new (or lora.init_from's) adapters.

    `adapter_reference` (LoRA, a loss with a reference): the reference is the base + a
    frozen copy of the adapters from the start (not the base alone), so that it can move
    later (online.reference="refresh") with one state structure for the whole run."""
    lora = settings.lora
    if lora is not None:
        lora_lib.validate(lora, model.config, settings.loss)   # against the loaded architecture
        adapters = (lora_io.read_peft(lora.init_from, model.config, lora, mesh=mesh,
                                      rules=settings.rules)
                    if lora.init_from else
                    lora_lib.init_adapters(model.config, lora, mesh=mesh, rules=settings.rules))
        graphdef, params = split_lora(model, adapters, lora)
    else:
        graphdef, params = split_model(model)
    state, shardings = init_sharded_state(settings.step, tx, mesh, int(model.config.hidden_size),
                                          lambda p: p, params, donate=True)
    if (adapter_reference and state.base_params is not None and state.reference_params is None
            and settings.loss.uses_reference):
        state, shardings = with_adapter_reference(state, shardings)
    return graphdef, state, shardings


def with_adapter_reference(state: TrainState, shardings: TrainState
                           ) -> tuple[TrainState, TrainState]:
    """(state, shardings) with reference_params = a float32 copy of the adapters, placed
    like them (base + the initial adapters: the initial policy)."""
    copier = jax.jit(functools.partial(reference_copy, dtype="float32"),
                     out_shardings=shardings.params)
    return (state.replace(reference_params=copier(state.params)),
            shardings.replace(reference_params=shardings.params))


def saved_state(state: TrainState, synced_reference: bool = False) -> TrainState:
    """What a checkpoint holds: the state without the frozen reference and, under LoRA, without
    the frozen base (both rebuilt on resume from model.path and lora.init_from). A reference
    that follows the policy (`synced_reference`: StepSettings.reference_sync) is kept: it
    cannot be rebuilt."""
    if synced_reference:
        return state.replace(base_params=None)
    return state.replace(reference_params=None, base_params=None)


def resume_state(checkpointer: Checkpointer, state: TrainState, train_iter: Any,
                 synced_reference: bool = False) -> tuple[TrainState, int, dict | None]:
    """The latest checkpoint's state on `state`'s shardings, its step and metrics window;
    with `synced_reference` the reference comes from the checkpoint too."""
    saved = saved_state(state, synced_reference)
    reference, base = state.reference_params, state.base_params
    abstract = abstract_like(saved)
    for leaf in jax.tree.leaves(saved):
        leaf.delete()  # free the fresh policy and optimizer buffers before reading the saved ones
    restored, step = checkpointer.restore(abstract, train_iter)
    meta = checkpointer.restore_meta(step)
    if synced_reference:
        reference = restored.reference_params
    return restored.replace(reference_params=reference, base_params=base), step, meta.get("window")


def lora_summary(state: TrainState, reference: str | None = None,
                 model_config: ModelConfig | None = None) -> str:
    """The log line of a LoRA run: trained adapter parameters against the frozen base's (and
    how the base is stored when `model_config` quantises it: QLoRA), and what the reference
    is (`reference`, or what the state says: base + the frozen starting adapter, or the base
    with the adapters off)."""
    count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
    trained, base = count(state.params), count(state.base_params)
    stored = ""
    if model_config is not None and model_config.quantization.enabled:  # codes are not parameters
        base = count(nnx.state(abstract_model(model_config.replace(quantization=Quantization()))))
        stored = f", stored {model_config.quantization.describe()}"
    reference = reference or ("the base + the frozen starting adapter"
                              if state.reference_params is not None
                              else "the base with the adapters off")
    return (f"LoRA: training {trained:,} adapter parameters ({100 * trained / base:.2f}% of the "
            f"{base:,} frozen base parameters{stored}); the reference is {reference}")


def check_config_changes(checkpointer: Checkpointer, settings: RunSettings, config_json: str,
                         workdir: str) -> str | None:
    """UserError when a resume changes the run's mathematics (kto_jax/train/config_change.py);
    otherwise the warning line naming what changed, or None."""
    return config_change.check_resume(checkpointer.restore_config(), json.loads(config_json),
                                      allow=settings.train.allow_config_change, where=workdir)


def open_logger(settings: RunSettings, workdir: str, total_steps: int,
                start_step: int) -> MetricsLogger:
    """The run's MetricsLogger (process 0 writes), continuing at `start_step`."""
    return MetricsLogger(workdir, total_steps=total_steps, start_step=start_step,
                         enabled=jax.process_index() == 0,
                         metric_names=settings.train.metric_names)


def write_run_files(workdir: str, config_json: str, model_config: ModelConfig, tokenizer) -> None:
    """WORKDIR/config.json and WORKDIR/model/ (HF config + tokenizer, for `kto-jax export`)."""
    if jax.process_index() != 0:
        return
    paths.makedirs(workdir)
    paths.write_text(layout.path(workdir, layout.CONFIG_FILE), config_json + "\n")
    write_model_source(workdir, model_config, tokenizer)


def setup_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Builds (or restores) everything a run needs; see the module docstring."""
    check_paths(config)
    check_scheme(config.train.metric_names)  # before any heavy work (and reading the rest)
    settings = read_settings(config)  # every shared setting checked, LoRA resolved: before loading
    workdir = paths.resolve(workdir)
    tokenizer = load_tokenizer(settings.model.path)
    data, num_steps = prepare_data(config, settings, tokenizer)
    settings = with_data_weights(settings, data)
    train_iter = data.train_iter_factory(forever=settings.train.num_steps > 0)
    run = assemble_run(config, settings, workdir, tokenizer, num_steps=num_steps, data=data,
                       train_iter=train_iter, checkpoint_every=settings.train.checkpoint_every)
    log_lines(run, [f"resuming from step {run.start_step} of {num_steps} in {workdir}"
                    if run.resuming else None,
                    run.changes, *data.summary.lines(),
                    lora_summary(run.state, model_config=run.model_config)
                    if run.state.base_params is not None else None])
    return run


def log_lines(run: Run, lines: list[str | None]) -> None:
    """The run's first messages: `lines` in order, the None ones skipped (e.g. the resume
    line of a fresh run)."""
    for line in lines:
        if line:
            run.logger.message(line)


def assemble_run(config: ml_collections.ConfigDict, settings: RunSettings, workdir: str,
                 tokenizer: Any, *, num_steps: int, data: Datasets | None, train_iter: Any,
                 checkpoint_every: int, adapter_reference: bool = False) -> Run:
    """The run every command trains (`kto-jax train`, online rounds), built in one order.

    Args:
      config, settings: the run's config and its `read_settings` (with the lambda weights
        the run trains with); `config` is what WORKDIR/config.json records.
      workdir: resolved; num_steps: optimizer steps of the whole run.
      data, train_iter: the run's data and its iterator (restored on a resume), or None
        (online rounds bring each round's).
      checkpoint_every: steps between the step loop's checkpoints.
      adapter_reference: see `initial_state`.
    A fresh run (no checkpoint) keeps no metrics rows of a dead one; a resumed run keeps
    those up to its checkpoint (`MetricsLogger`).
    """
    config_json = config_to_json(config, loss=settings.step.hparams)
    mesh = shd.make_mesh(config.mesh)
    tx, schedule = make_optimizer(settings.optim, num_steps)
    checkpointer = Checkpointer(layout.path(workdir, layout.CHECKPOINT_DIR),
                                every_steps=checkpoint_every, keep=settings.train.checkpoint_keep,
                                async_save=settings.train.async_save)
    resuming = checkpointer.latest_step() is not None
    changes = (check_config_changes(checkpointer, settings, config_json, workdir) if resuming
               else None)
    model, model_config = load_policy(settings, mesh)
    graphdef, state, shardings = initial_state(settings, model, tx, mesh,
                                               adapter_reference=adapter_reference)
    del model
    start_step, window = 0, None
    if resuming:
        state, start_step, window = resume_state(checkpointer, state, train_iter,
                                                 settings.step.reference_sync is not None)
    elif jax.process_index() == 0:
        for name in (layout.METRICS_FILE, layout.EVAL_METRICS_FILE):
            truncate_after(layout.path(workdir, name), -1)  # a fresh run: no rows of a dead one
    logger = open_logger(settings, workdir, num_steps, start_step)
    write_run_files(workdir, config_json, model_config, tokenizer)
    device = jax.devices()[0]
    return Run(
        config=config, config_json=config_json, settings=settings, workdir=workdir, mesh=mesh,
        model_config=model_config, tokenizer=tokenizer, graphdef=graphdef, state=state,
        train_step=step_lib.make_train_step(settings.step, graphdef, tx, schedule, mesh,
                                            shardings),
        eval_step=step_lib.make_eval_step(settings.step, graphdef, mesh, shardings),
        batch_sharding=batch_sharding(mesh, settings.rules), data=data,
        train_iter=train_iter, num_steps=num_steps, start_step=start_step, window=window,
        checkpointer=checkpointer, logger=logger,
        flop_dims=flops_lib.ModelDims.of(model_config),
        peak_flops=flops_lib.peak_flops_per_device(device.device_kind, device.platform),
        shardings=shardings, resuming=resuming, changes=changes)

