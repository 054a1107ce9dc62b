"""LoRA adapters on the stacked layer weights: W_eff = W + (alpha / r) A B.

The adapters are their own NNX module (`LoraAdapters`), holding for every target
projection W (HF names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) two
stacked factors, each a `flax.nnx.LoRAParam`:

    A: [L, *in_shape(W), r]     logical axes ('layers', <W's input axes>, None)
    B: [L, r, *out_shape(W)]    logical axes ('layers', None, <W's output axes>)

so `kto_jax.sharding`'s rule table shards them like the matrix they adapt (A along
W's input axis, e.g. 'embed' -> fsdp; B along W's output axes, e.g. 'heads'/'mlp'
-> tensor). B starts at zero: the policy equals the base at step 0, bit for bit.

The adapted product is computed on the activations, never by forming W + dW:
x W + (alpha / r) (x A) B, inside the same `lax.scan` over layers as the base
weights (`Transformer.layer_arrays` adds the factors to the scan's xs). The
backward therefore costs O(tokens * r * (in + out)) for the adapters and no
[in, out] weight gradient for the frozen base.

One set of base weights serves both forwards:
    policy    = attach(model, adapters, dropout_key=key)   # base + adapters (trained)
    reference = model                                       # base alone
    reference = attach(model, frozen_initial_adapters)      # base + a starting (SFT) adapter

A mixture of experts' experts take adapters as an option (targets `expert_gate_up_proj`,
`expert_down_proj`; `EXPERT_TARGETS`): one adapter per expert on the fused parameter
transformers and PEFT hold (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), so

    A: [L, E, in, r]    ('layers', 'expert', <in axis>, None)
    B: [L, E, r, out]   ('layers', 'expert', None, <out axis>)

where gate_up's out is gate's and up's columns side by side (gate and up share their A,
as in PEFT's adapter of the fused weight). kto_jax.models.moe applies them inside the
grouped expert matmul: each assignment's rows times its own expert's A, then B (two
more grouped matmuls of width r), never a dense per-expert delta.

Which adapters exist is `LoraConfig` (config.lora, read once by the runtime:
kto_jax/train/settings.py, `resolve_lora`), checked by `validate(...)` before anything is
compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kto_jax import sharding as shd
from kto_jax.errors import UserError
from kto_jax.models.config import ModelConfig
from kto_jax.models.moe import EXPERT_ADAPTERS, MOE_MLP
from kto_jax.models.transformer import LAYER_AXES, Transformer, layer_param_shapes

Array = jax.Array

# HF module name -> number of leading (input) axes of our per-layer weight; the rest are output axes.
TARGET_IN_AXES: dict[str, int] = {
    "q_proj": 1, "k_proj": 1, "v_proj": 1,    # [D | N, hd]
    "o_proj": 2,                              # [H, hd | D]
    "gate_proj": 1, "up_proj": 1,             # [D | F]
    "down_proj": 1,                           # [F | D]
}
TARGET_MODULES = tuple(TARGET_IN_AXES)
# HF module path of each target inside a decoder layer (PEFT key names, kto_jax.models.lora_io).
TARGET_HF_PATHS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                   "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
                   "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}
# A mixture of experts' per-expert adapters (module docstring): target -> the expert
# parameters (kto_jax.models.moe.EXPERT_PARAMS) whose output columns its B spans, side by side.
EXPERT_TARGETS: dict[str, tuple[str, ...]] = EXPERT_ADAPTERS
# The parameter of transformers' experts module each adapts (PEFT `target_parameters`).
EXPERT_HF_PATHS = {"expert_gate_up_proj": "mlp.experts.gate_up_proj", "expert_down_proj": "mlp.experts.down_proj"}
KNOWN_TARGETS = TARGET_MODULES + tuple(EXPERT_TARGETS)
A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
DROPOUT_KEY = "lora_dropout_key"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """config.lora as a hashable value (usable as a jit static); rank 0 means off."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES
    seed: int = 0
    init_from: str = ""

    @classmethod
    def from_config(cls, lora: Any) -> LoraConfig:
        """From config.lora as a mapping (the runtime passes its fields); target_modules may
        be a list or a comma/space separated string (as given on the command line)."""
        get = lora.get if hasattr(lora, "get") else lambda k, d=None: getattr(lora, k, d)
        targets = get("target_modules", TARGET_MODULES)
        items = [targets] if isinstance(targets, str) else targets   # the command line gives ('a,b',)
        targets = [t for item in items for t in str(item).replace(",", " ").split()]
        return cls(rank=int(get("rank", 0)), alpha=float(get("alpha", 16.0)),
                   dropout=float(get("dropout", 0.0)), target_modules=tuple(targets),
                   seed=int(get("seed", 0)), init_from=str(get("init_from", "") or ""))

    @property
    def enabled(self) -> bool:
        return self.rank != 0 or bool(self.init_from)

    @property
    def scale(self) -> float:
        """alpha / r, the factor of the adapter term."""
        return self.alpha / self.rank


def validate(lora: LoraConfig, model_config: ModelConfig | None = None, loss: Any = None) -> None:
    """Raise UserError naming the config.lora setting that is wrong; call before compiling.

    Checks: rank > 0 when LoRA is on, alpha > 0, 0 <= dropout < 1, target modules known
    and present in `model_config`'s architecture, the loss's extra heads (a HaloLoss's
    `uses_*_head` fields) trainable next to adapters. The adapter directory of
    `lora.init_from` is checked where it is read (`kto_jax.models.lora_io.read_peft`).
    """
    if not lora.enabled:
        return
    if lora.rank < 0 or (lora.rank == 0 and not lora.init_from):  # 0 with init_from: the adapter's rank
        raise UserError(f"config.lora.rank={lora.rank}: the LoRA rank must be a positive integer "
                        "(e.g. --config.lora.rank=16); 0 turns LoRA off")
    if not lora.alpha > 0:
        raise UserError(f"config.lora.alpha={lora.alpha}: must be > 0 (the adapter term is scaled by alpha / rank)")
    if not 0.0 <= lora.dropout < 1.0:
        raise UserError(f"config.lora.dropout={lora.dropout}: must be in [0, 1)")
    if not lora.target_modules:
        raise UserError("config.lora.target_modules is empty; name at least one of " + " ".join(KNOWN_TARGETS))
    unknown = [t for t in lora.target_modules if t not in KNOWN_TARGETS]
    if unknown:
        raise UserError(f"config.lora.target_modules: unknown module(s) {', '.join(unknown)}; "
                        f"choose among {' '.join(KNOWN_TARGETS)}")
    if len(set(lora.target_modules)) != len(lora.target_modules):
        raise UserError(f"config.lora.target_modules lists a module twice: {' '.join(lora.target_modules)}")
    experts = [t for t in lora.target_modules if t in EXPERT_TARGETS]
    if experts and lora.dropout:
        raise UserError(f"config.lora.dropout={lora.dropout} with expert adapters ({' '.join(experts)}): "
                        "PEFT's adapters of expert parameters have no dropout, nor do ours; "
                        "set --config.lora.dropout=0")
    if model_config is not None:
        present = layer_param_shapes(model_config)
        absent = [t for t in lora.target_modules if not set(EXPERT_TARGETS.get(t, (t,))) <= set(present)]
        if absent:
            kept = " ".join(t for t in lora.target_modules if t not in absent) or "q_proj k_proj v_proj o_proj"
            moe = (" (a mixture of experts has no dense MLP; adapt its experts with expert_gate_up_proj "
                   f"expert_down_proj, or set --config.lora.target_modules='{kept}')" if model_config.num_experts
                   else " (expert_* targets are for mixtures of experts)" if experts else "")
            raise UserError(f"config.lora.target_modules: {', '.join(absent)} not in "
                            f"{model_config.architecture}{moe}")
        if experts and model_config.quantization.enabled:
            raise UserError(f"config.lora.target_modules: expert adapters ({' '.join(experts)}) on a quantised "
                            "base are not supported; set --config.lora.base_quantization=none or adapt the "
                            "attention only")
    head = getattr(loss, "value_head", None)   # a HaloLoss's extra trained head, if any
    if head is not None and not head.beside_lora:
        raise UserError(f"config.lora.rank={lora.rank} with config.loss.name={loss.name!r}: the loss's extra "
                        f"head ({head.name}) cannot be trained next to LoRA adapters; "
                        "set --config.lora.rank=0 for this loss")


def target_layers(model_config: ModelConfig, target: str) -> tuple[int, ...]:
    """The layers (HF indices, in order) a target's stacked factors hold: those of its
    parameters' stack (ModelConfig.stack_layers; in a mixture of experts with dense layers
    an expert target's are the sparse layers, a dense MLP target's the dense ones)."""
    return model_config.stack_layers(EXPERT_TARGETS.get(target, (target,))[0])


def factor_shapes(model_config: ModelConfig, rank: int, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A shape, B shape) of one target, both with the leading L axis (an expert target's
    next the E axis: [L, E, in, r], [L, E, r, out summed over its parameters]); L = the
    layers of its stack (`target_layers`)."""
    shapes = layer_param_shapes(model_config)
    n = len(target_layers(model_config, target))
    if target in EXPERT_TARGETS:
        ws = [shapes[name] for name in EXPERT_TARGETS[target]]     # each [E, in, out]
        e, d_in = ws[0][:2]
        return (n, e, d_in, rank), (n, e, rank, sum(w[2] for w in ws))
    w = shapes[target]
    n_in = TARGET_IN_AXES[target]
    return (n, *w[:n_in], rank), (n, rank, *w[n_in:])


def factor_axes(target: str) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
    """Logical axes of (A, B): A follows W's input axes, B W's output axes; r is replicated
    (an expert target's A and B keep W's 'expert' axis)."""
    if target in EXPERT_TARGETS:
        expert, d_in, d_out = MOE_MLP.axes[EXPERT_TARGETS[target][0]]
        return ("layers", expert, d_in, None), ("layers", expert, None, d_out)
    axes = LAYER_AXES[target]
    n_in = TARGET_IN_AXES[target]
    return ("layers", *axes[:n_in], None), ("layers", None, *axes[n_in:])


class LoraAdapters(nnx.Module):
    """Stacked A and B factors (`nnx.LoRAParam`, float32) of every target; see the module docstring.

    Attributes `{target}_lora_a`, `{target}_lora_b`; static `targets`, `scale` (alpha / r)
    and `dropout`. A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's default init), B = 0.
    """

    def __init__(self, model_config: ModelConfig, lora: LoraConfig, *, rngs: nnx.Rngs):
        self.targets = tuple(lora.target_modules)
        self.scale = lora.scale
        self.dropout = lora.dropout
        for target in self.targets:
            a_shape, b_shape = factor_shapes(model_config, lora.rank, target)
            a_axes, b_axes = factor_axes(target)
            fan_in = a_shape[2:-1] if target in EXPERT_TARGETS else a_shape[1:-1]
            bound = 1.0 / math.sqrt(math.prod(fan_in))
            a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound)
            setattr(self, target + A_SUFFIX, _lora_param(a, a_axes))
            setattr(self, target + B_SUFFIX, _lora_param(jnp.zeros(b_shape, jnp.float32), b_axes))

    def factors(self, target: str) -> tuple[Array, Array]:
        """(A [L, *in, r], B [L, r, *out]) of one target."""
        return getattr(self, target + A_SUFFIX)[...], getattr(self, target + B_SUFFIX)[...]

    def scan_inputs(self, num_layers: int) -> dict[str, Array]:
        """The layer scan's extra xs: A and (alpha / r) B per target, and per-layer dropout keys.

        `kto_jax.models.transformer.dense` adds x A (scale B) to x W when it finds them.
        """
        xs = {}
        for target in self.targets:
            a, b = self.factors(target)
            xs[target + A_SUFFIX] = a
            xs[target + B_SUFFIX] = b * jnp.asarray(self.scale, b.dtype)
        key = getattr(self, "dropout_key", None)
        if key is not None and self.dropout > 0:
            xs[DROPOUT_KEY] = jax.random.split(key, num_layers)
            xs["lora_dropout_rate"] = jnp.full((num_layers,), self.dropout, jnp.float32)
        return xs


def _lora_param(value: Array, axes: tuple[str | None, ...]) -> nnx.LoRAParam:
    return nnx.LoRAParam(value, out_sharding=axes, eager_sharding=False)


def init_adapters(model_config: ModelConfig, lora: LoraConfig, *, mesh: Mesh | None = None,
                  rules: Any = None) -> LoraAdapters:
    """Adapters created directly on their NamedShardings (seed `lora.seed`)."""
    mesh = mesh if mesh is not None else shd.single_device_mesh()
    graphdef, abstract_state = nnx.split(abstract_adapters(model_config, lora))
    shardings = shd.named_shardings(abstract_state, mesh, shd.rules_of(rules))

    @jax.jit
    def create():
        state = nnx.state(LoraAdapters(model_config, lora, rngs=nnx.Rngs(lora.seed)))
        return jax.lax.with_sharding_constraint(state, shardings)

    return nnx.merge(graphdef, create())


def abstract_adapters(model_config: ModelConfig, lora: LoraConfig) -> LoraAdapters:
    """The adapters with ShapeDtypeStruct leaves (AOT compile, checkpoint restore targets)."""
    return nnx.eval_shape(lambda: LoraAdapters(model_config, lora, rngs=nnx.Rngs(lora.seed)))


def attach(model: Transformer, adapters: LoraAdapters | None, *, dropout_key: Array | None = None,
           ) -> Transformer:
    """The policy: a Transformer sharing `model`'s base weights, with `adapters` in every layer.

    `model` itself is left without adapters (it is still the reference); the two share
    their base Variables (no copy), so never assign into the policy's base weights. With
    `dropout_key`, the adapters' inputs get dropout (config.lora.dropout), as PEFT
    applies it: x W + scale * B A dropout(x). Works under jit and grad: the new
    object holds the same arrays (tracers), so gradients reach both.
    """
    graphdef, state = nnx.split(model)
    policy = nnx.merge(graphdef, state)
    if adapters is not None and dropout_key is not None and adapters.dropout > 0:
        adapters = nnx.merge(*nnx.split(adapters))
        adapters.dropout_key = nnx.data(dropout_key)
    policy.lora = adapters
    return policy


def trainable_count(adapters: LoraAdapters) -> int:
    """Number of trained adapter parameters (A and B of every target)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(adapters, nnx.LoRAParam)))


def delta_weight(adapters: LoraAdapters, target: str) -> Array:
    """(alpha / r) A B: [L, *W shape], float32; W + this is the merged weight (an expert
    target's: [L, E, in, out], each expert's own A_e B_e, out spanning its parameters)."""
    a, b = adapters.factors(target)
    if target in EXPERT_TARGETS:
        return adapters.scale * jnp.einsum("leir,lero->leio", a, b, precision=jax.lax.Precision.HIGHEST)
    n = a.shape[0]
    flat = jnp.einsum("lir,lro->lio", a.reshape(n, -1, a.shape[-1]), b.reshape(n, b.shape[1], -1),
                      precision=jax.lax.Precision.HIGHEST)
    return (adapters.scale * flat).reshape(n, *a.shape[1:-1], *b.shape[2:])


def param_deltas(adapters: LoraAdapters) -> dict[str, Array]:
    """{layer parameter name: its float32 delta [L, *W shape]} of every target (an expert
    target's delta split into its parameters' columns: gate_up into gate and up)."""
    deltas = {}
    for target in adapters.targets:
        delta = delta_weight(adapters, target)
        names = EXPERT_TARGETS.get(target, (target,))
        for name, part in zip(names, jnp.split(delta, len(names), axis=-1) if len(names) > 1 else (delta,)):
            deltas[name] = part
    return deltas


def merge(model: Transformer, adapters: LoraAdapters) -> Transformer:
    """A new Transformer whose target weights are W + (alpha / r) A B (in model.param_dtype).
    A quantised base has no float W to merge into: `lora_io.save_merged` writes it merged."""
    if model.config.quantization.enabled:
        raise ValueError("lora.merge: the base is quantised; write it merged with "
                         "kto_jax.models.lora_io.save_merged (dequantised W + delta, layer by layer)")
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state, copy=True)  # new Variables: `model` keeps its weights
    if getattr(merged, "lora", None) is not None:
        del merged.lora
    for name, delta in param_deltas(adapters).items():
        var = getattr(merged.layers, name)
        w = var[...]
        var.set_value((w.astype(jnp.float32) + delta).astype(w.dtype))
    return merged
