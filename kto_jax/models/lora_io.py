"""LoRA adapters in and out: PEFT adapter directories and merged Hugging Face checkpoints.

PEFT layout (what `peft.PeftModel.from_pretrained(hf_model, DIR)` loads):
  adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, ...
  adapter_model.safetensors    base_model.model.model.layers.{i}.<self_attn|mlp>.<target>.lora_A.weight [r, in]
                               base_model.model.model.layers.{i}.<...>.lora_B.weight              [out, r]
(a multimodal model's language model: base_model.model.model.language_model.layers.{i}...,
and `exclude_modules` keeps PEFT off the vision tower's projections of the same names)
with HF's delta W_hf = (alpha / r) lora_B @ lora_A. In our layout (kto_jax.models.params)
the delta is (alpha / r) A B with A [*in, r], B [r, *out], so per layer
lora_A = A.reshape(-1, r).T and lora_B = B.reshape(r, -1).T: the same flattening of
heads (head, head_dim) as the base weights' HEADS_IN / HEADS_OUT transforms.

Expert adapters (a mixture of experts' `expert_gate_up_proj` / `expert_down_proj`,
kto_jax.models.lora) go to PEFT's `target_parameters` (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`: transformers' fused [E, out, in] expert parameters), where PEFT
nests one wrapper per parameter (gate_up innermost, as transformers defines them):
  base_model.model.model.layers.{i}.mlp.experts[.base_layer].lora_A.weight   [E * r, in]   row e*r + j
  base_model.model.model.layers.{i}.mlp.experts.lora_B.weight               [out, r * E]  column j*E + e
so lora_A = A[l].transpose(0, 2, 1).reshape(E * r, in), lora_B = B[l].transpose(2, 1, 0).reshape(out, r * E)
(gate_up's out: gate's rows, then up's, as transformers' chunk(2) reads them).

Merged export writes W + (alpha / r) A B through the ordinary HF export
(`kto_jax.models.hf_io.save_pretrained`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from kto_jax import hub
from kto_jax import sharding as shd
from kto_jax.errors import UserError
from kto_jax.models import lora as lora_lib
from kto_jax.models.config import ModelConfig
from kto_jax.models.hf_io import _to_host, _write_json, place, save_pretrained
from kto_jax.models.transformer import Transformer

__all__ = ["save_peft", "save_merged", "read_peft", "read_peft_config", "to_peft_tensors", "peft_key", "frozen"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = "base_model.model.{layer}{path}.lora_{factor}.weight"
# PEFT features our adapters do not have: config key -> the value meaning "not used".
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
                "alpha_pattern": {}, "layer_replication": None}


def layer_prefix(config: ModelConfig | None) -> str:
    """The HF module path of decoder layer {i}: 'model.layers.{i}.', or where the family's rows
    put it (a multimodal checkpoint's language model: 'model.language_model.layers.{i}.')."""
    if config is None:
        return "model.layers.{i}."
    q_proj = next(r for r in config.family.rows if r.path == ("layers", "q_proj"))
    return q_proj.hf_name.removesuffix(lora_lib.TARGET_HF_PATHS["q_proj"] + ".weight")


def peft_key(layer: int, target: str, factor: str, config: ModelConfig | None = None,
             targets: tuple[str, ...] = ()) -> str:
    """The PEFT tensor name of one factor ('A' or 'B') of `target` in decoder layer `layer`
    (of a model of `config`'s family; None: Llama's layout). An expert target's name
    depends on the other expert targets of the adapter (`targets`): PEFT nests them."""
    path = lora_lib.TARGET_HF_PATHS.get(target)
    if path is None:  # an expert parameter: its wrapper, one base_layer. per wrapper around it
        nested = [t for t in lora_lib.EXPERT_TARGETS if t in targets or t == target]
        path = lora_lib.EXPERT_HF_PATHS[target].rsplit(".", 1)[0] + ".base_layer" * (
            len(nested) - 1 - nested.index(target))
    return _KEY.format(layer=layer_prefix(config).format(i=layer), path=path, factor=factor)


def to_peft_tensors(adapters: lora_lib.LoraAdapters, num_layers: int,
                    config: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """{PEFT name: float32 host array} of every factor of every layer."""
    tensors = {}
    for target in adapters.targets:
        a, b = (_to_host(x).astype(np.float32) for x in adapters.factors(target))
        r = a.shape[-1]
        layers = range(num_layers) if config is None else lora_lib.target_layers(config, target)
        for j, i in enumerate(layers):                # row j of the stack: layer i
            if target in lora_lib.EXPERT_TARGETS:   # A [E, in, r], B [E, r, out] (module docstring)
                peft_a = a[j].transpose(0, 2, 1).reshape(-1, a.shape[2])
                peft_b = b[j].transpose(2, 1, 0).reshape(b.shape[-1], -1)
            else:
                peft_a, peft_b = a[j].reshape(-1, r).T, b[j].reshape(r, -1).T
            tensors[peft_key(i, target, "A", config, adapters.targets)] = np.ascontiguousarray(peft_a)
            tensors[peft_key(i, target, "B", config, adapters.targets)] = np.ascontiguousarray(peft_b)
    return tensors


def from_peft_tensor(tensor: np.ndarray, target: str, factor: str, shape: tuple[int, ...]) -> np.ndarray:
    """One layer's factor in our layout (`shape`, without L) from its PEFT tensor (the
    inverse of `to_peft_tensors`)."""
    if target not in lora_lib.EXPERT_TARGETS:
        return tensor.T.reshape(shape)
    e, x, y = shape                                     # A: [E, in, r]; B: [E, r, out]
    if factor == "a":
        return tensor.reshape(e, y, x).transpose(0, 2, 1)
    return tensor.reshape(y, x, e).transpose(2, 1, 0)


def _peft_shape(target: str, factor: str, shape: tuple[int, ...], rank: int) -> tuple[int, int]:
    """The PEFT tensor shape of one layer's factor of our `shape` (with L)."""
    if target in lora_lib.EXPERT_TARGETS:
        e = shape[1]
        return (e * rank, shape[2]) if factor == "a" else (shape[3], rank * e)
    return (rank, int(np.prod(shape[1:-1]))) if factor == "a" else (int(np.prod(shape[2:])), rank)


def save_peft(adapters: lora_lib.LoraAdapters, model_config: ModelConfig, out_dir: str, *,
              base_model_name_or_path: str = "") -> None:
    """Write adapter_config.json + adapter_model.safetensors (float32) that `peft` loads
    onto the original HF model. Only process 0 writes."""
    tensors = to_peft_tensors(adapters, model_config.num_layers, model_config)
    rank = adapters.factors(adapters.targets[0])[0].shape[-1]
    experts = [lora_lib.EXPERT_HF_PATHS[t] for t in lora_lib.EXPERT_TARGETS if t in adapters.targets]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank),
              "lora_alpha": float(adapters.scale * rank), "lora_dropout": float(adapters.dropout),
              "target_modules": [t for t in adapters.targets if t not in lora_lib.EXPERT_TARGETS],
              "target_parameters": experts or None,
              "base_model_name_or_path": base_model_name_or_path or None,
              "init_lora_weights": True, "inference_mode": True, **_UNSUPPORTED}
    if model_config.family.passthrough:  # e.g. a vision tower whose q/k/v_proj share our targets' names
        config["exclude_modules"] = "(" + "|".join(re.escape(p) for p in model_config.family.passthrough) + ").*"
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        _write_json(os.path.join(out_dir, ADAPTER_CONFIG), config)


def save_merged(model: Transformer, adapters: lora_lib.LoraAdapters, out_dir: str, *,
                tokenizer: Any = None, dtype: str | None = None) -> None:
    """An HF checkpoint of W + (alpha / r) A B (`kto_jax.models.hf_io.save_pretrained`); for a
    quantised base, W dequantised and merged one layer at a time."""
    if model.config.quantization.enabled:
        save_pretrained(model, out_dir, tokenizer=tokenizer, dtype=dtype, adapters=adapters)
        return
    save_pretrained(lora_lib.merge(model, adapters), out_dir, tokenizer=tokenizer, dtype=dtype)


def read_peft_config(directory: str, lora: lora_lib.LoraConfig | None = None) -> lora_lib.LoraConfig:
    """The LoraConfig of a PEFT adapter directory (config.lora.init_from).

    `lora` (config.lora) supplies dropout and seed; its rank, alpha and target_modules
    must agree with the directory when rank is set (0 takes the directory's).
    """
    where = f"config.lora.init_from={directory!r}"
    path = os.path.join(hub.resolve_id(directory, what="config.lora.init_from"), ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"{where}: no {ADAPTER_CONFIG}; give a directory written by peft's save_pretrained "
                        "or `kto-jax export --format=peft`")
    with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    if hf.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{where}: peft_type {hf.get('peft_type')!r} is not LORA")
    for key, off in _UNSUPPORTED.items():
        if hf.get(key, off) not in (off, None, {}, False):
            raise UserError(f"{where}: {key}={hf[key]!r} in {ADAPTER_CONFIG} is not supported "
                            "(kto-jax reads plain LoRA adapters)")
    targets, parameters = hf.get("target_modules"), hf.get("target_parameters") or []
    if not isinstance(targets, list) or not isinstance(parameters, list):
        raise UserError(f"{where}: target_modules {targets!r} must be a list of module names "
                        f"among {' '.join(lora_lib.TARGET_MODULES)} (target_parameters a list among "
                        f"{' '.join(lora_lib.EXPERT_HF_PATHS.values())})")
    experts = {path: t for t, path in lora_lib.EXPERT_HF_PATHS.items()}
    unknown = [t for t in targets if t not in lora_lib.TARGET_MODULES] + [p for p in parameters if p not in experts]
    if unknown:
        raise UserError(f"{where}: the adapter targets {', '.join(map(str, unknown))}; kto-jax adapts only "
                        f"{' '.join(lora_lib.TARGET_MODULES)} and the experts' "
                        f"{' '.join(lora_lib.EXPERT_HF_PATHS.values())}")
    targets = tuple(t for t in lora_lib.KNOWN_TARGETS if t in targets or lora_lib.EXPERT_HF_PATHS.get(t) in parameters)
    lora = lora or lora_lib.LoraConfig()
    found = lora_lib.LoraConfig(rank=int(hf["r"]), alpha=float(hf["lora_alpha"]), dropout=lora.dropout,
                                target_modules=targets, seed=lora.seed, init_from=directory)
    if lora.rank:
        for name, want, got in (("rank", lora.rank, found.rank), ("alpha", lora.alpha, found.alpha),
                                ("target_modules", set(lora.target_modules), set(found.target_modules))):
            if want != got:
                raise UserError(f"config.lora.{name}={want} but the adapter in {directory!r} has {got}; "
                                f"set --config.lora.{name} to match or --config.lora.rank=0 to take the adapter's")
    return found


def read_peft(directory: str, model_config: ModelConfig, lora: lora_lib.LoraConfig | None = None, *,
              mesh: Mesh | None = None, rules: Any = None) -> lora_lib.LoraAdapters:
    """Adapters from a PEFT adapter directory, checked against the base model and placed
    on their shardings. UserError names the mismatch (module, layer count, shape)."""
    found = read_peft_config(directory, lora)
    lora_lib.validate(found, model_config)
    weights = os.path.join(hub.resolve_id(directory, what="config.lora.init_from"), ADAPTER_WEIGHTS)
    try:
        tensors = load_file(weights)
    except (FileNotFoundError, SafetensorError) as e:
        raise UserError(f"config.lora.init_from={directory!r}: cannot read {ADAPTER_WEIGHTS}: {e}") from e
    tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}
    expected = {peft_key(i, t, f, model_config, found.target_modules) for t in found.target_modules
                for i in lora_lib.target_layers(model_config, t) for f in "AB"}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise UserError(f"config.lora.init_from={directory!r} does not match the base model "
                        f"({model_config.architecture}, {model_config.num_layers} layers): "
                        f"{len(missing)} missing tensor(s) {missing[:3]}, {len(extra)} unexpected {extra[:3]}")
    mesh = mesh if mesh is not None else shd.single_device_mesh()
    graphdef, state = nnx.split(lora_lib.abstract_adapters(model_config, found))
    shardings = dict(nnx.to_flat_state(shd.named_shardings(state, mesh, shd.rules_of(rules))))
    for path, var in nnx.to_flat_state(state):
        target, factor = path[-1].rsplit("_lora_", 1)
        shape = var.get_value().shape
        value = np.empty(shape, np.float32)
        want = _peft_shape(target, factor, shape, found.rank)
        for j, i in enumerate(lora_lib.target_layers(model_config, target)):  # row j: layer i
            name = peft_key(i, target, factor.upper(), model_config, found.target_modules)
            tensor = tensors[name]
            if tuple(tensor.shape) != want:
                raise UserError(f"config.lora.init_from={directory!r}: tensor {name!r} has shape "
                                f"{tuple(tensor.shape)} but the base model needs {want}")
            value[j] = from_peft_tensor(tensor, target, factor, shape[1:])
        var.set_value(place(value, shardings[path].get_value()))
    return nnx.merge(graphdef, state)


def frozen(adapters: lora_lib.LoraAdapters) -> lora_lib.LoraAdapters:
    """A copy whose factors pass through stop_gradient (the reference's starting adapter)."""
    graphdef, state = nnx.split(adapters)
    return nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))
