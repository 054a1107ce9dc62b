"""From a run to a Hugging Face checkpoint (`kto-jax export`, and the end of `kto-jax train`).

At start-up the trainer writes WORKDIR/model/: the policy's HF config.json and its
tokenizer. Export needs nothing else from the original model path: it builds the
abstract model from that config, restores only the `params` of a checkpoint
(never the optimizer moments) onto one device, and writes config.json, sharded
safetensors with an index, and the tokenizer through
`kto_jax.models.save_pretrained`, which transformers loads unchanged.
A LoRA run (docs/lora.md) checkpoints only its adapters: its export is the base of
config.model.path with W + (alpha / r) A B merged in (a QLoRA run: the dequantised base,
merged layer by layer), or (--format=peft) the adapter directory that `peft` loads onto
the original, unquantised HF model.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
from flax import nnx

from kto_jax import sharding as shd
from kto_jax import hub
from kto_jax.errors import UserError
from kto_jax.models import ModelConfig, abstract_model, load_tokenizer, save_pretrained
from kto_jax.models import lora as lora_lib
from kto_jax.models.quantize import Quantization
from kto_jax.step import adapters as adapters_lib
from kto_jax import fs as paths
from kto_jax.train import workdir as layout

EXPORT_FORMATS = ("merged", "peft")


def write_model_source(workdir: str, model_config: ModelConfig, tokenizer: Any) -> None:
    """WORKDIR/model/config.json (HF layout) and the tokenizer files."""
    with paths.staged_dir(layout.path(workdir, layout.MODEL_DIR)) as out:
        with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
            json.dump(model_config.to_hf(), f, indent=2, sort_keys=True)
        tokenizer.save_pretrained(out)


def export_params(graphdef: Any, params: Any, out_dir: str, tokenizer: Any,
                  dtype: str | None = None) -> None:
    """Writes the policy `params` (an nnx.Param state of `graphdef`, or under LoRA a LoraView
    of a LoraGraph: the merged weights W + (alpha / r) A B) as an HF checkpoint.

    Every process takes part (the weights are gathered); process 0 writes.
    """
    model = adapters_lib.model_of(graphdef, params)
    adapters = getattr(model, "lora", None)
    if adapters is not None and not model.config.quantization.enabled:
        model, adapters = lora_lib.merge(model, adapters), None
    # a quantised base (QLoRA) merges layer by layer while it is written: dequantised W + delta
    if jax.process_index() != 0:
        save_pretrained(model, os.devnull, tokenizer=None, dtype=dtype or None, adapters=adapters)
        return
    with paths.staged_dir(out_dir) as local:
        save_pretrained(model, local, tokenizer=tokenizer, dtype=dtype or None, adapters=adapters)
        paths.share_like_open(local)


def _abstract_params(model_config: ModelConfig, mesh, rules) -> tuple[Any, Any]:
    """(graphdef, params as ShapeDtypeStructs on their shardings over `mesh`)."""
    graphdef, params = nnx.split(abstract_model(model_config), nnx.Param)
    shardings = shd.named_shardings(params, mesh, shd.rules_of(rules))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            params, shardings)
    return graphdef, abstract


def _abstract_adapters(model_config: ModelConfig, lora: lora_lib.LoraConfig, mesh, rules
                       ) -> tuple[Any, Any]:
    """(adapter graphdef, adapter state as ShapeDtypeStructs on their shardings over `mesh`)."""
    graphdef, state = nnx.split(lora_lib.abstract_adapters(model_config, lora))
    shardings = shd.named_shardings(state, mesh, shd.rules_of(rules))
    return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  state, shardings)


def run_lora(config: dict) -> lora_lib.LoraConfig | None:
    """The LoraConfig a run trained with (its saved config), or None for a full-parameter run."""
    lora = lora_lib.LoraConfig.from_config(config.get("lora") or {})
    if not lora.enabled:
        return None
    if lora.init_from and not lora.rank:  # rank 0 + init_from: the adapter directory's rank
        from kto_jax.models.lora_io import read_peft_config
        lora = read_peft_config(lora.init_from, lora)
    return lora


PEFT_BASE_DIR = "base"  # where a GGUF base is written as an HF checkpoint, inside the adapter dir


def peft_base_name(model_path: str) -> str:
    """What adapter_config.json's base_model_name_or_path names for the run's model.path:
    a hub id as it is, a local directory as an absolute path (peft and transformers
    resolve it from any working directory), a URL as it is."""
    if hub.looks_like_hub_id(model_path) or paths.is_remote(model_path):
        return model_path
    return os.path.abspath(model_path)


def _load_base(workdir: str, config: dict, quantized: bool = True) -> Any:
    """The run's base model (config.model.path: a directory, hub id or .gguf) on one device,
    stored as the run stored it (config.lora.base_quantization) unless not `quantized`."""
    from kto_jax.models import from_pretrained
    base_path = config["model"]["path"]
    if not (os.path.exists(base_path) or paths.is_remote(base_path) or hub.looks_like_hub_id(base_path)):
        raise UserError(f"the export of the LoRA run in {workdir!r} needs its base model "
                        f"config.model.path={base_path!r}, which does not exist: restore it there, "
                        "or export the adapters alone with --format=peft")
    one_device = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
    base, _ = from_pretrained(base_path, mesh=one_device, rules=config["mesh"],
                              param_dtype=config["model"]["param_dtype"], dtype=config["model"]["dtype"],
                              quantization=run_quantization(config) if quantized else None)
    return base


def run_quantization(config: dict) -> Quantization:
    """How a run stored its frozen base (its saved config.lora; none for older runs)."""
    lora = config.get("lora") or {}
    return Quantization(lora.get("base_quantization", "none") or "none", bool(lora.get("double_quant", False)))


def export_peft(workdir: str, out_dir: str, config: dict, model_config: ModelConfig,
                adapters: lora_lib.LoraAdapters, tokenizer: Any, dtype: str | None,
                log: Callable[[str], None] = print) -> None:
    """adapter_config.json + adapter_model.safetensors (+ the tokenizer) in `out_dir`, naming
    a base that `peft.AutoPeftModelForCausalLM.from_pretrained(out_dir)` can load: the run's
    HF directory or hub id; for a .gguf base (which transformers cannot take as a base), that
    model written as an HF checkpoint to OUT/base, named by its absolute path."""
    from kto_jax.models.lora_io import save_peft
    model_path = config["model"]["path"]
    base_name = peft_base_name(model_path)
    if str(model_path).endswith(".gguf"):
        base_dir = paths.join(out_dir, PEFT_BASE_DIR)
        graphdef, params = nnx.split(_load_base(workdir, config, quantized=False), nnx.Param)
        export_params(graphdef, params, base_dir, tokenizer, dtype)  # the original, unquantised base
        base_name = paths.resolve(base_dir)
        log(f"the base {model_path} is a GGUF file, which transformers cannot load as a PEFT base: "
            f"wrote it as an HF checkpoint to {base_name} (adapter_config.json names it)")
    with paths.staged_dir(out_dir) as local:
        save_peft(adapters, model_config, local, base_model_name_or_path=base_name)
        if jax.process_index() == 0:
            if tokenizer is not None:
                tokenizer.save_pretrained(local)
            paths.share_like_open(local)


def export_merged_lora(workdir: str, out_dir: str, config: dict, adapters: lora_lib.LoraAdapters,
                       tokenizer: Any, dtype: str | None) -> None:
    """W + (alpha / r) A B on the base weights of config.model.path, an ordinary HF checkpoint;
    a QLoRA run's W is its base dequantised (what it trained against), merged layer by layer."""
    graphdef, params = nnx.split(_load_base(workdir, config), nnx.Param)
    agraph, astate = nnx.split(adapters)
    export_params(adapters_lib.LoraGraph(graphdef, agraph), adapters_lib.LoraView(params, astate),
                  out_dir, tokenizer, dtype)


def export_checkpoint(workdir: str, out_dir: str, *, step: int | None = None,
                      dtype: str | None = None, fmt: str = "merged",
                      log: Callable[[str], None] = print) -> int:
    """Writes checkpoint `step` (default: the latest) of `workdir` to `out_dir`; returns the step.

    `fmt`: 'merged' (an HF checkpoint; for a LoRA run W + (alpha / r) A B on the base of
    config.model.path) or 'peft' (a LoRA run's adapter directory, which `peft` loads onto
    the original HF model).
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format={fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    from kto_jax.train.checkpoint import Checkpointer  # orbax: only when exporting
    ckpt_dir = layout.path(workdir, layout.CHECKPOINT_DIR)
    if not paths.exists(ckpt_dir):
        raise UserError(f"no checkpoint in {workdir!r} (expected {ckpt_dir}): is it the "
                        "--workdir of a `kto-jax train` run?")
    checkpointer = Checkpointer(ckpt_dir, read_only=True)
    try:
        config = checkpointer.restore_config(step)
        hf_config = _read_model_config(workdir)
        model_config = ModelConfig.from_hf(hf_config, param_dtype=config["model"]["param_dtype"],
                                           dtype=config["model"]["dtype"])
        one_device = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
        lora = run_lora(config)
        if lora is None and fmt == "peft":
            raise UserError(f"--format=peft: the run in {workdir!r} trained every parameter "
                            "(config.lora.rank=0), so it has no adapters; use --format=merged")
        if lora is None:
            graphdef, abstract = _abstract_params(model_config, one_device, config["mesh"]["rules"])
        else:  # only the adapters are checkpointed
            graphdef, abstract = _abstract_adapters(model_config, lora, one_device,
                                                    config["mesh"]["rules"])
        params, step = checkpointer.restore_subtree("params", abstract, step=step)
    finally:
        checkpointer.close()
    with paths.local_copy(layout.path(workdir, layout.MODEL_DIR)) as model_dir:
        tokenizer = load_tokenizer(model_dir)
    export_dtype = dtype or config.get("train", {}).get("export_dtype") or None
    if lora is None:
        export_params(graphdef, params, out_dir, tokenizer, export_dtype)
    elif fmt == "peft":
        export_peft(workdir, out_dir, config, model_config, nnx.merge(graphdef, params), tokenizer,
                    export_dtype, log)
    else:
        export_merged_lora(workdir, out_dir, config, nnx.merge(graphdef, params), tokenizer,
                           export_dtype)
    return step


def _read_model_config(workdir: str) -> dict:
    path = layout.path(workdir, layout.MODEL_DIR, "config.json")
    if not paths.exists(path):
        raise UserError(f"{path} is missing: the workdir was not written by `kto-jax train`.")
    return json.loads(paths.read_text(path))
