"""ModelConfig: the shape and numerics of one decoder-only transformer.

One frozen (hashable) dataclass covers every supported Hugging Face architecture. What
an architecture fixes (its norm formula, MLP block, parameter names, which switches it
always has) is its family's record (kto_jax/models/families/, one module per family);
the config holds the numbers a checkpoint chooses, the feature switches (q/k/v bias,
q/k RMSNorm, sliding windows, tied embeddings, RoPE scaling) and our own run settings.
`from_hf` reads a transformers `config.json` dict, `to_hf` writes one back that
transformers loads to the same architecture. `layer_kinds` says how the layers of one
model differ (sliding window or global, RoPE table), which the layer scan carries per
layer. Named presets (`llama32_1b()`, ...) give real model shapes without a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

from kto_jax.errors import UserError
from kto_jax.models.families import FAMILIES, architecture_of_model_type, family_of
from kto_jax.models.family import Family
from kto_jax.models.layers import ACTIVATIONS, GATED_MLP
from kto_jax.models.quantize import NO_QUANTIZATION, Quantization
from kto_jax.models.moe import MOE_IMPLS, MOE_MLP

# HF `architectures[0]` -> HF `model_type`, one entry per family.
SUPPORTED_ARCHITECTURES = {f.architecture: f.model_type for f in FAMILIES.values()}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
DTYPES = ("float32", "bfloat16", "float16")
FULL, SLIDING = "full_attention", "sliding_attention"  # HF layer_types entries
# Feature fields and their off value. A family fixes some (Family.fixed) and lets a
# checkpoint set some (Family.options); any other family keeps them off.
FEATURES = {"attention_bias": False, "qk_norm": False, "sliding_window": None,
            "layer_types": None, "rope_local_theta": None, "query_pre_attn_scalar": None,
            "attn_logit_softcap": None, "final_logit_softcap": None, "outer_config": None,
            "num_experts": None, "num_experts_per_tok": None, "moe_intermediate_size": None,
            "norm_topk_prob": False, "router_aux_loss_coef": 0.0, "dense_mlp_layers": ()}
# config.json key of `ModelConfig.untrained_from` in a run's own copy of the config (WORKDIR/model);
# an exported checkpoint's config.json never has it.
UNTRAINED_FROM_KEY = "kto_jax_untrained_tensors_from"
# keys of a multimodal config.json that ModelConfig writes itself (not kept in outer_config)
_OWN_OUTER_KEYS = ("architectures", "model_type", "torch_dtype", "dtype", UNTRAINED_FROM_KEY)
# keys a multimodal config.json's top level sets for its language model too
_SHARED_OUTER_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")


def dtype_name(value: Any, what: str = "dtype") -> str:
    """The name in DTYPES of a dtype given as a name ("bfloat16"), a JAX/NumPy dtype or
    scalar type (`jnp.bfloat16`, `np.float32`) or a torch dtype (`torch.bfloat16`);
    `what` names the argument in the error."""
    if isinstance(value, str):
        name = value
    else:
        try:
            name = jnp.dtype(value).name
        except TypeError:
            name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise UserError(f"{what} {value!r} is not one of {', '.join(DTYPES)} (give a name, or e.g. jnp.bfloat16)")
    return name


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What may differ between two layers of one model without changing their parameters."""

    window: int | None = None  # sliding window W: a query sees the last W positions; None: global
    rope: int = 0              # RoPE table (ModelConfig.rope_tables): 0 global, 1 local


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of one decoder-only transformer (hashable: usable as a jit static)."""

    architecture: str = "LlamaForCausalLM"  # HF architectures[0]: the family (kto_jax/models/families/)
    vocab_size: int = 256                   # HF vocab_size
    hidden_size: int = 64                   # HF hidden_size (D)
    intermediate_size: int = 128            # HF intermediate_size (F, gated MLP width)
    num_layers: int = 2                     # HF num_hidden_layers (L)
    num_heads: int = 4                      # HF num_attention_heads (H)
    num_kv_heads: int = 2                   # HF num_key_value_heads (K, GQA groups)
    head_dim: int = 16                      # HF head_dim (default hidden_size // num_attention_heads)
    rms_norm_eps: float = 1e-5              # HF rms_norm_eps
    rope_theta: float = 10000.0             # HF rope_theta (v5: rope_parameters.rope_theta)
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF rope_scaling as sorted (key, value) pairs
    max_position_embeddings: int = 2048     # HF max_position_embeddings
    tie_word_embeddings: bool = False       # HF tie_word_embeddings: lm_head = embed^T
    attention_bias: bool = False            # bias on q/k/v projections (Qwen2, where it is always on)
    qk_norm: bool = False                   # norm over head_dim on q and k before RoPE (Qwen3, always on)
    sliding_window: int | None = None       # HF sliding_window W of the sliding layers (Mistral: all)
    bos_token_id: int | None = None         # HF bos_token_id
    eos_token_id: int | tuple[int, ...] | None = None  # HF eos_token_id (a list becomes a tuple)
    pad_token_id: int | None = None         # HF pad_token_id
    param_dtype: str = "float32"            # dtype the weights are stored in (a name; jnp.float32 etc. become one)
    dtype: str = "float32"                  # compute dtype of activations and matmuls (likewise)
    remat_policy: str = "none"              # "none" | "full" | "dots" | "dots_no_batch"
    attention_impl: str = "auto"            # "auto" | "xla" | "cudnn" (jax.nn.dot_product_attention) | "splash" (Pallas, TPU)
    hidden_act: str = "silu"                # HF hidden_act of the gated MLP (layers.ACTIVATIONS)
    layer_types: tuple[str, ...] | None = None  # HF layer_types: per layer "full_attention" | "sliding_attention";
                                            # None: every layer sliding when sliding_window is set, else full
    rope_local_theta: float | None = None   # RoPE base of the sliding layers (Gemma 3's local base); None: rope_theta
    query_pre_attn_scalar: float | None = None  # HF query_pre_attn_scalar: attention scale s**-0.5 (Gemma);
                                            # None: head_dim
    attn_logit_softcap: float | None = None  # HF attn_logit_softcapping: c * tanh(logits / c) (Gemma 2)
    final_logit_softcap: float | None = None  # HF final_logit_softcapping, on the LM head's logits (Gemma 2)
    outer_config: str | None = None         # a multimodal checkpoint's config.json without its text_config
                                            # (JSON text), written back around the language model's
    untrained_from: str | None = None       # the checkpoint whose untrained tensors (Family.passthrough:
                                            # a vision tower) an export copies through; set on load
    quantization: Quantization = NO_QUANTIZATION  # how the frozen base's layer projections are stored
                                            # (QLoRA: config.lora.base_quantization); never in config.json
    # mixture of experts (Qwen3-MoE, Mixtral: kto_jax/models/moe.py); None: a dense MLP
    num_experts: int | None = None          # HF num_experts (Qwen3-MoE) / num_local_experts (Mixtral): E
    num_experts_per_tok: int | None = None  # HF num_experts_per_tok: k experts per token
    moe_intermediate_size: int | None = None  # an expert's gated-MLP width (Mixtral: intermediate_size)
    norm_topk_prob: bool = False            # renormalise the k chosen probabilities (Mixtral: always)
    router_aux_loss_coef: float = 0.0       # weight of the router's load-balancing loss in training
                                            # (default the checkpoint's; 0: off)
    dense_mlp_layers: tuple[int, ...] = ()  # layers of a mixture of experts whose MLP is a dense gated MLP
                                            # of width intermediate_size (Qwen3-MoE's mlp_only_layers and
                                            # decoder_sparse_step); (): every layer sparse
    moe_impl: str = "ragged"                # "ragged": grouped expert matmuls (ragged_dot) | "blocks": grouped
                                            # in blocks of 128 rows (faster off TPU) | "dense": every expert
                                            # on every token (the reference formulation)

    def __post_init__(self):
        for name in ("param_dtype", "dtype"):
            object.__setattr__(self, name, dtype_name(getattr(self, name), f"model {name}"))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        object.__setattr__(self, "dense_mlp_layers", tuple(sorted(set(self.dense_mlp_layers))))
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            default = (SLIDING if self.sliding_window else FULL,) * self.num_layers
            object.__setattr__(self, "layer_types", None if types == default else types)
        self.validate()

    # ---- checks ----
    def validate(self) -> None:
        """Raise UserError on an unsupported architecture, rope type or option."""
        family = family_of(self.architecture)
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UserError(
                f"unsupported rope_scaling rope_type {self.rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("hidden_act", self.hidden_act, tuple(ACTIVATIONS))
        _check_choice("moe_impl", self.moe_impl, MOE_IMPLS)
        _check_features(self, family)
        if self.layer_types is not None:
            _check_layer_types(self.layer_types, self.num_layers, self.sliding_window)
        if self.num_experts is not None or family.mlp is MOE_MLP:
            _check_experts(self)
        if self.dense_mlp_layers:
            _check_dense_mlp_layers(self)
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_kv_heads})")

    # ---- derived ----
    @property
    def family(self) -> Family:
        """The family record of `architecture` (kto_jax/models/families/)."""
        return family_of(self.architecture)

    @property
    def rope_type(self) -> str:
        """'default' without scaling, else rope_scaling's rope_type (or legacy 'type')."""
        scaling = self.rope_scaling_dict
        return scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    @property
    def model_type(self) -> str:
        return self.family.model_type

    @property
    def attention_scale(self) -> float:
        """The factor of q . k in attention: query_pre_attn_scalar ** -0.5 (Gemma), else head_dim ** -0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def attention_types(self) -> tuple[str, ...]:
        """Per layer "full_attention" or "sliding_attention" (HF layer_types), always L long."""
        if self.layer_types is not None:
            return self.layer_types
        return (SLIDING if self.sliding_window else FULL,) * self.num_layers

    def rope_tables(self) -> tuple[tuple[float, dict[str, Any] | None], ...]:
        """(base, HF rope_scaling or None) of each RoPE table: the global one, then the
        local one of the sliding layers when `rope_local_theta` is set (unscaled)."""
        tables = ((self.rope_theta, self.rope_scaling_dict),)
        return tables + ((self.rope_local_theta, None),) if self.rope_local_theta is not None else tables

    def layer_kinds(self) -> tuple[tuple[LayerKind, ...], tuple[int, ...]]:
        """(kinds, kind of each layer): the distinct LayerKinds in order of first use, and
        for each of the L layers the index of its kind. One kind: every layer alike."""
        local_rope = 1 if self.rope_local_theta is not None else 0
        each = [LayerKind(self.sliding_window, local_rope) if t == SLIDING else LayerKind()
                for t in self.attention_types]
        kinds = tuple(dict.fromkeys(each))
        return kinds, tuple(kinds.index(k) for k in each)

    def stack_layers(self, name: str) -> tuple[int, ...]:
        """The layers (HF indices, in order) whose weights the stacked layer parameter `name`
        holds along its leading axis: every layer, except in a mixture of experts with dense
        layers (`dense_mlp_layers`), where the dense MLP's weights stack the dense layers
        and the router's and experts' the sparse ones."""
        layers = tuple(range(self.num_layers))
        if not self.dense_mlp_layers:
            return layers
        if name in GATED_MLP.axes:
            return self.dense_mlp_layers
        if name in MOE_MLP.axes:
            return tuple(i for i in layers if i not in self.dense_mlp_layers)
        return layers

    def mlp_rows(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(kind, row) of each layer's MLP, for a mixture of experts with dense layers: kind 1
        sparse (router and experts), 0 dense; row = the layer's index in its kind's stack.
        None when every layer has the family's MLP."""
        if not self.dense_mlp_layers:
            return None
        dense, sparse = self.stack_layers("gate_proj"), self.stack_layers("router")
        kinds = tuple(0 if i in dense else 1 for i in range(self.num_layers))
        rows = tuple(dense.index(i) if i in dense else sparse.index(i) for i in range(self.num_layers))
        return kinds, rows

    def flop_dims(self) -> dict[str, int]:
        """The sizes a FLOP count reads (kto_jax.step.flops.ModelDims' fields), from the config
        itself rather than from HF config.json names."""
        dims = {"hidden": self.hidden_size, "intermediate": self.intermediate_size,
                "layers": self.num_layers, "heads": self.num_heads, "kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "vocab": self.vocab_size}
        if self.num_experts:  # the active experts count: k of E, each of the experts' width
            dims.update(intermediate=self.moe_intermediate_size, experts=self.num_experts,
                        experts_per_token=self.num_experts_per_tok)
            if self.dense_mlp_layers:  # the dense layers' MLP: intermediate_size wide
                dims.update(dense_layers=len(self.dense_mlp_layers), dense_intermediate=self.intermediate_size)
        return dims

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied (e.g. dtypes, remat policy)."""
        return dataclasses.replace(self, **changes)

    # ---- HF conversion ----
    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Build from a transformers config.json dict (v4 or v5 style).

        The keys every family shares are read here, the family's own by its `read_hf`.
        `overrides` set our own fields (param_dtype, dtype, remat_policy, attention_impl).
        """
        family = family_of(_architecture_of(hf))
        arch = family.architecture
        outer = hf
        if family.text_config_key:  # a multimodal checkpoint: its language model's config
            hf = {**(hf.get(family.text_config_key) or {}),
                  **{k: hf[k] for k in _SHARED_OUTER_KEYS if hf.get(k) is not None}}
        hf = {**family.hf_defaults, **hf}
        hidden_act = {"swish": "silu"}.get(hf.get("hidden_act", "silu"), hf.get("hidden_act", "silu"))
        if hf.get("mlp_bias") or (hf.get("attention_bias") and not family.fixed.get("attention_bias")):
            raise UserError(f"{arch} with attention_bias/mlp_bias=true is not supported "
                            "(its o_proj/MLP biases have no slot in our layout)")
        rope_theta, rope_scaling = _rope_of(hf)
        heads = hf["num_attention_heads"]
        fields = dict(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            hidden_act=hidden_act,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            **family.fixed,
        )
        fields.update(family.read_hf(hf))
        if fields["hidden_act"] not in ACTIVATIONS:
            raise UserError(f"unsupported hidden_act {fields['hidden_act']!r} in {arch}; supported: "
                            f"{', '.join(ACTIVATIONS)} (gated MLP)")
        if family.text_config_key:
            kept = {k: v for k, v in outer.items() if k not in (family.text_config_key, *_OWN_OUTER_KEYS)}
            fields["outer_config"] = json.dumps(kept, sort_keys=True)
        if outer.get(UNTRAINED_FROM_KEY):
            fields["untrained_from"] = outer[UNTRAINED_FROM_KEY]
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers loads to this architecture and shape."""
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
        }
        hf.update(self.family.write_hf(self))
        key = self.family.text_config_key
        if key:  # the language model's config inside the multimodal one it came from
            text = {k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")}
            hf = {**json.loads(self.outer_config or "{}"), "architectures": [self.architecture],
                  "model_type": self.model_type, key: {**text, "model_type": self.family.text_model_type},
                  "torch_dtype": self.param_dtype}
        if self.untrained_from:
            hf[UNTRAINED_FROM_KEY] = self.untrained_from
        return hf


def _freeze(d: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"model {name} {value!r} is not one of {', '.join(choices)}")


def _check_features(config: ModelConfig, family: Family) -> None:
    """Each feature field as the family has it: fixed, a checkpoint's option, or off."""
    arch = config.architecture
    for name, off in FEATURES.items():
        value = getattr(config, name)
        if name in family.fixed and value != family.fixed[name]:
            raise UserError(f"{name}={value!r} does not match {arch}: {arch} always has "
                            f"{name}={family.fixed[name]!r}")
        if name not in family.fixed and name not in family.options and value != off:
            owners = [f.architecture for f in FAMILIES.values()
                      if name in f.options or f.fixed.get(name, off) != off]
            raise UserError(f"{name}={value!r} does not match {arch}, which has no {name} "
                            f"(it belongs to {', '.join(owners) or 'no supported architecture'})")


def _check_experts(config: ModelConfig) -> None:
    e, k, f = config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size
    if not (e and k and f and 0 < k <= e):
        raise UserError(f"{config.architecture}: num_experts_per_tok ({k}) must be between 1 and num_experts "
                        f"({e}), and moe_intermediate_size ({f}) set")
    if config.router_aux_loss_coef < 0:
        raise UserError(f"router_aux_loss_coef={config.router_aux_loss_coef} must be >= 0 (0 turns it off)")


def _check_dense_mlp_layers(config: ModelConfig) -> None:
    dense, n = config.dense_mlp_layers, config.num_layers
    if dense[0] < 0 or dense[-1] >= n or len(dense) == n:
        raise UserError(f"{config.architecture}: dense MLP layers {list(dense)} must be some (not all) of the "
                        f"{n} layers 0..{n - 1} (mlp_only_layers / decoder_sparse_step in config.json)")
    if config.quantization.enabled:
        raise UserError(f"{config.architecture} with dense MLP layers among the sparse ones ({list(dense)}) "
                        "on a quantised base is not supported; set --config.lora.base_quantization=none")


def _check_layer_types(types: tuple[str, ...], num_layers: int, window: int | None) -> None:
    if len(types) != num_layers or not set(types) <= {FULL, SLIDING}:
        raise UserError(f"layer_types {list(types)} must list {num_layers} entries (num_hidden_layers), "
                        f"each {FULL!r} or {SLIDING!r}")
    if SLIDING in types and not window:
        raise UserError(f"layer_types has {SLIDING!r} layers but sliding_window is {window!r}; "
                        "set sliding_window to the window of those layers")


def _architecture_of(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    if archs:
        return archs[0]
    return architecture_of_model_type(hf.get("model_type")) or f"model_type={hf.get('model_type')!r}"


def _rope_of(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from v4 (`rope_theta`, `rope_scaling`) or v5 (`rope_parameters`)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {}) or dict(params)
    theta = hf.get("rope_theta", params.get("rope_theta", scaling.get("rope_theta", 10000.0)))
    scaling.pop("rope_theta", None)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UserError(f"unsupported rope_scaling rope_type {rope_type!r}; supported: "
                        f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    return float(theta), scaling


# ---- presets: real model shapes without a checkpoint (values from each model's config.json) ----

def _llama3_rope(factor: float) -> dict[str, Any]:
    # HF rope_scaling of Llama 3.1 / 3.2: rope_type llama3, low/high_freq_factor 1/4, original 8192.
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def tiny(**overrides: Any) -> ModelConfig:
    """A 2-layer Llama-shaped toy (vocab 256, D 64, GQA 4/2) for tests and demos."""
    return ModelConfig(**{"architecture": "LlamaForCausalLM", "bos_token_id": 1,
                          "eos_token_id": 2, "pad_token_id": 0, **overrides})


def llama2_7b(**overrides: Any) -> ModelConfig:
    """meta-llama/Llama-2-7b-hf."""
    return ModelConfig(**{
        "architecture": "LlamaForCausalLM",
        "vocab_size": 32000, "hidden_size": 4096,           # vocab_size, hidden_size
        "intermediate_size": 11008, "num_layers": 32,       # intermediate_size, num_hidden_layers
        "num_heads": 32, "num_kv_heads": 32, "head_dim": 128,  # num_attention_heads, num_key_value_heads
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0,        # rms_norm_eps, rope_theta
        "max_position_embeddings": 4096,                    # max_position_embeddings
        "bos_token_id": 1, "eos_token_id": 2, **overrides})


def llama3_8b(**overrides: Any) -> ModelConfig:
    """meta-llama/Meta-Llama-3-8B (no rope scaling; 3.1 is `llama31_8b`)."""
    return ModelConfig(**{
        "architecture": "LlamaForCausalLM",
        "vocab_size": 128256, "hidden_size": 4096,          # vocab_size, hidden_size
        "intermediate_size": 14336, "num_layers": 32,       # intermediate_size, num_hidden_layers
        "num_heads": 32, "num_kv_heads": 8, "head_dim": 128,  # num_attention_heads, num_key_value_heads
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0,       # rms_norm_eps, rope_theta
        "max_position_embeddings": 8192,                    # max_position_embeddings
        "bos_token_id": 128000, "eos_token_id": 128001, **overrides})


def llama31_8b(**overrides: Any) -> ModelConfig:
    """meta-llama/Llama-3.1-8B: llama3 rope scaling, factor 8, 128k context."""
    return llama3_8b(**{"rope_scaling": _llama3_rope(8.0),        # rope_scaling
                        "max_position_embeddings": 131072, **overrides})


def llama3_70b(**overrides: Any) -> ModelConfig:
    """meta-llama/Meta-Llama-3-70B (`llama31_70b` adds the 3.1 rope scaling)."""
    return llama3_8b(**{"hidden_size": 8192, "intermediate_size": 28672,  # hidden_size, intermediate_size
                        "num_layers": 80, "num_heads": 64, "num_kv_heads": 8,  # num_hidden_layers, heads
                        **overrides})


def llama31_70b(**overrides: Any) -> ModelConfig:
    """meta-llama/Llama-3.1-70B."""
    return llama3_70b(**{"rope_scaling": _llama3_rope(8.0),
                         "max_position_embeddings": 131072, **overrides})


def llama32_1b(**overrides: Any) -> ModelConfig:
    """meta-llama/Llama-3.2-1B: tied embeddings, llama3 rope scaling factor 32."""
    return llama3_8b(**{"hidden_size": 2048, "intermediate_size": 8192,  # hidden_size, intermediate_size
                        "num_layers": 16, "num_heads": 32, "num_kv_heads": 8,  # num_hidden_layers, heads
                        "head_dim": 64,                                  # head_dim
                        "rope_scaling": _llama3_rope(32.0),              # rope_scaling
                        "max_position_embeddings": 131072,
                        "tie_word_embeddings": True, **overrides})       # tie_word_embeddings


def llama32_3b(**overrides: Any) -> ModelConfig:
    """meta-llama/Llama-3.2-3B."""
    return llama32_1b(**{"hidden_size": 3072, "intermediate_size": 8192, "num_layers": 28,
                         "num_heads": 24, "num_kv_heads": 8, "head_dim": 128, **overrides})


def mistral_7b(**overrides: Any) -> ModelConfig:
    """mistralai/Mistral-7B-v0.1: 4096-token sliding window."""
    return ModelConfig(**{
        "architecture": "MistralForCausalLM",
        "vocab_size": 32000, "hidden_size": 4096,           # vocab_size, hidden_size
        "intermediate_size": 14336, "num_layers": 32,       # intermediate_size, num_hidden_layers
        "num_heads": 32, "num_kv_heads": 8, "head_dim": 128,  # num_attention_heads, num_key_value_heads
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0,        # rms_norm_eps, rope_theta
        "sliding_window": 4096,                             # sliding_window
        "max_position_embeddings": 32768,
        "bos_token_id": 1, "eos_token_id": 2, **overrides})


def ministral_8b(**overrides: Any) -> ModelConfig:
    """mistralai/Ministral-8B-Instruct-2410: one global layer, then three with a 32k window."""
    return ModelConfig(**{
        "architecture": "MinistralForCausalLM",
        "vocab_size": 131072, "hidden_size": 4096,          # vocab_size, hidden_size
        "intermediate_size": 12288, "num_layers": 36,       # intermediate_size, num_hidden_layers
        "num_heads": 32, "num_kv_heads": 8, "head_dim": 128,  # num_attention_heads, num_key_value_heads
        "rms_norm_eps": 1e-5, "rope_theta": 100000000.0,    # rms_norm_eps, rope_theta
        "sliding_window": 32768,                            # sliding_window
        "layer_types": (FULL, SLIDING, SLIDING, SLIDING) * 9,  # layer_types ("ragged 128k, 32k, 32k, 32k")
        "max_position_embeddings": 131072,                  # max_position_embeddings
        "bos_token_id": 1, "eos_token_id": 2, **overrides})


def qwen25_0_5b(**overrides: Any) -> ModelConfig:
    """Qwen/Qwen2.5-0.5B: q/k/v bias, tied embeddings."""
    return ModelConfig(**{
        "architecture": "Qwen2ForCausalLM",
        "vocab_size": 151936, "hidden_size": 896,           # vocab_size, hidden_size
        "intermediate_size": 4864, "num_layers": 24,        # intermediate_size, num_hidden_layers
        "num_heads": 14, "num_kv_heads": 2, "head_dim": 64,  # num_attention_heads, num_key_value_heads
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,      # rms_norm_eps, rope_theta
        "max_position_embeddings": 32768, "attention_bias": True,
        "tie_word_embeddings": True,                        # tie_word_embeddings
        "bos_token_id": 151643, "eos_token_id": 151643, **overrides})


def qwen25_3b(**overrides: Any) -> ModelConfig:
    """Qwen/Qwen2.5-3B (the paper's Table 1 Qwen)."""
    return qwen25_0_5b(**{"hidden_size": 2048, "intermediate_size": 11008, "num_layers": 36,
                          "num_heads": 16, "num_kv_heads": 2, "head_dim": 128, **overrides})


def qwen3_0_6b(**overrides: Any) -> ModelConfig:
    """Qwen/Qwen3-0.6B: q/k RMSNorm, explicit head_dim 128 (> hidden/heads)."""
    return ModelConfig(**{
        "architecture": "Qwen3ForCausalLM",
        "vocab_size": 151936, "hidden_size": 1024,          # vocab_size, hidden_size
        "intermediate_size": 3072, "num_layers": 28,        # intermediate_size, num_hidden_layers
        "num_heads": 16, "num_kv_heads": 8, "head_dim": 128,  # num_attention_heads, num_key_value_heads, head_dim
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,      # rms_norm_eps, rope_theta
        "max_position_embeddings": 40960, "qk_norm": True,
        "tie_word_embeddings": True,                        # tie_word_embeddings
        "bos_token_id": 151643, "eos_token_id": 151645, **overrides})


def qwen3_30b_a3b(**overrides: Any) -> ModelConfig:
    """Qwen/Qwen3-30B-A3B: 48 mixture-of-experts layers, 128 experts of width 768, top 8
    (renormalised): 30.5B parameters, 3.3B active per token."""
    return ModelConfig(**{
        "architecture": "Qwen3MoeForCausalLM",
        "vocab_size": 151936, "hidden_size": 2048,          # vocab_size, hidden_size
        "intermediate_size": 6144, "num_layers": 48,        # intermediate_size (unused: no dense layer), num_hidden_layers
        "num_heads": 32, "num_kv_heads": 4, "head_dim": 128,  # num_attention_heads, num_key_value_heads, head_dim
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,      # rms_norm_eps, rope_theta
        "max_position_embeddings": 40960, "qk_norm": True,  # max_position_embeddings
        "num_experts": 128, "num_experts_per_tok": 8,       # num_experts, num_experts_per_tok
        "moe_intermediate_size": 768, "norm_topk_prob": True,  # moe_intermediate_size, norm_topk_prob
        "router_aux_loss_coef": 0.001,                      # router_aux_loss_coef
        "bos_token_id": 151643, "eos_token_id": 151645, **overrides})


def mixtral_8x7b(**overrides: Any) -> ModelConfig:
    """mistralai/Mixtral-8x7B-v0.1: 32 layers of 8 experts (width 14336), top 2: 46.7B
    parameters, 12.9B active per token."""
    return ModelConfig(**{
        "architecture": "MixtralForCausalLM",
        "vocab_size": 32000, "hidden_size": 4096,           # vocab_size, hidden_size
        "intermediate_size": 14336, "num_layers": 32,       # intermediate_size, num_hidden_layers
        "num_heads": 32, "num_kv_heads": 8, "head_dim": 128,  # num_attention_heads, num_key_value_heads
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,      # rms_norm_eps, rope_theta
        "max_position_embeddings": 32768,                   # max_position_embeddings
        "num_experts": 8, "num_experts_per_tok": 2,         # num_local_experts, num_experts_per_tok
        "moe_intermediate_size": 14336, "norm_topk_prob": True,  # (intermediate_size: the experts')
        "router_aux_loss_coef": 0.02,                       # router_aux_loss_coef
        "bos_token_id": 1, "eos_token_id": 2, **overrides})


# Gemma: values from each model's config.json (HF hub, not reachable offline: checked against
# public copies of those files and google-deepmind/gemma's TransformerConfig). Unlisted
# fields are the family's HF defaults (eps 1e-6, tied embeddings, GeGLU, bos 2 / eos 1 / pad 0).

def _gemma(architecture: str, fields: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    common = {"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "gelu_pytorch_tanh",
              "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    return ModelConfig(**{"architecture": architecture, **common, **fields, **overrides})


def _gemma2_layers(n: int) -> tuple[str, ...]:
    return tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n))  # sliding first, then alternating


def _gemma3_layers(n: int) -> tuple[str, ...]:
    return tuple(SLIDING if (i + 1) % 6 else FULL for i in range(n))  # sliding_window_pattern 6


def gemma2_2b(**overrides: Any) -> ModelConfig:
    """google/gemma-2-2b: soft-capped attention (50) and final logits (30), window 4096 on every other layer."""
    return _gemma("Gemma2ForCausalLM", {
        "vocab_size": 256000, "hidden_size": 2304,          # vocab_size, hidden_size
        "intermediate_size": 9216, "num_layers": 26,        # intermediate_size, num_hidden_layers
        "num_heads": 8, "num_kv_heads": 4, "head_dim": 256,  # num_attention_heads, num_key_value_heads, head_dim
        "query_pre_attn_scalar": 256,                       # query_pre_attn_scalar
        "attn_logit_softcap": 50.0, "final_logit_softcap": 30.0,  # attn_/final_logit_softcapping
        "sliding_window": 4096, "layer_types": _gemma2_layers(26),  # sliding_window (HF's default layer_types)
        "rope_theta": 10000.0, "max_position_embeddings": 8192}, overrides)  # rope_theta, max_position_embeddings


def gemma2_9b(**overrides: Any) -> ModelConfig:
    """google/gemma-2-9b."""
    return gemma2_2b(**{"hidden_size": 3584, "intermediate_size": 14336,  # hidden_size, intermediate_size
                        "num_layers": 42, "num_heads": 16, "num_kv_heads": 8,  # num_hidden_layers, heads
                        "layer_types": _gemma2_layers(42), **overrides})


def gemma2_27b(**overrides: Any) -> ModelConfig:
    """google/gemma-2-27b: head_dim 128 but query_pre_attn_scalar 144 (hidden / heads)."""
    return gemma2_2b(**{"hidden_size": 4608, "intermediate_size": 36864,  # hidden_size, intermediate_size
                        "num_layers": 46, "num_heads": 32, "num_kv_heads": 16,  # num_hidden_layers, heads
                        "head_dim": 128, "query_pre_attn_scalar": 144,   # head_dim, query_pre_attn_scalar
                        "layer_types": _gemma2_layers(46), **overrides})


def gemma3_1b(**overrides: Any) -> ModelConfig:
    """google/gemma-3-1b-pt (Gemma3ForCausalLM): q/k norms, 5 sliding (512) : 1 global layers,
    local RoPE base 10k, global 1M unscaled."""
    return _gemma("Gemma3ForCausalLM", {
        "vocab_size": 262144, "hidden_size": 1152,          # vocab_size, hidden_size
        "intermediate_size": 6912, "num_layers": 26,        # intermediate_size, num_hidden_layers
        "num_heads": 4, "num_kv_heads": 1, "head_dim": 256,  # num_attention_heads, num_key_value_heads, head_dim
        "query_pre_attn_scalar": 256, "qk_norm": True,      # query_pre_attn_scalar
        "sliding_window": 512, "layer_types": _gemma3_layers(26),  # sliding_window, sliding_window_pattern 6
        "rope_theta": 1_000_000.0, "rope_local_theta": 10_000.0,  # rope_theta, rope_local_base_freq
        "max_position_embeddings": 32768,                   # max_position_embeddings
        "eos_token_id": (1, 106)}, overrides)               # eos_token_id (1 and <end_of_turn>)


# The 4B-27B checkpoints are Gemma3ForConditionalGeneration: config.json's top level and its
# SigLIP vision_config (kept as they are; the language model is what kto-jax trains).
_GEMMA3_VISION = json.dumps({
    "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
    "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}},
    sort_keys=True)


def gemma3_4b(**overrides: Any) -> ModelConfig:
    """google/gemma-3-4b-pt (Gemma3ForConditionalGeneration): its language model, from text_config
    (which lists these; the rest are Gemma3TextConfig defaults: vocab 262208, 128k positions);
    the global layers' RoPE linearly scaled by 8, window 1024; vision tower as config.json has it."""
    return gemma3_1b(**{"architecture": "Gemma3ForConditionalGeneration", "outer_config": _GEMMA3_VISION,
                        "vocab_size": 262208,                            # (default) vocab_size
                        "hidden_size": 2560, "intermediate_size": 10240,  # hidden_size, intermediate_size
                        "num_layers": 34, "num_heads": 8, "num_kv_heads": 4,  # num_hidden_layers, heads
                        "sliding_window": 1024, "layer_types": _gemma3_layers(34),  # sliding_window
                        "rope_scaling": {"rope_type": "linear", "factor": 8.0},  # rope_scaling
                        "max_position_embeddings": 131072, **overrides})  # (default) max_position_embeddings


def gemma3_12b(**overrides: Any) -> ModelConfig:
    """google/gemma-3-12b-pt (Gemma3ForConditionalGeneration; the language model's shape)."""
    return gemma3_4b(**{"hidden_size": 3840, "intermediate_size": 15360,  # hidden_size, intermediate_size
                        "num_layers": 48, "num_heads": 16, "num_kv_heads": 8,  # num_hidden_layers, heads
                        "layer_types": _gemma3_layers(48), **overrides})


def gemma3_27b(**overrides: Any) -> ModelConfig:
    """google/gemma-3-27b-pt (Gemma3ForConditionalGeneration): head_dim 128, query_pre_attn_scalar
    168 (hidden / heads)."""
    return gemma3_4b(**{"hidden_size": 5376, "intermediate_size": 21504,  # hidden_size, intermediate_size
                        "num_layers": 62, "num_heads": 32, "num_kv_heads": 16,  # num_hidden_layers, heads
                        "head_dim": 128, "query_pre_attn_scalar": 168,   # head_dim, query_pre_attn_scalar
                        "layer_types": _gemma3_layers(62), **overrides})


PRESETS = {f.__name__: f for f in (tiny, llama2_7b, llama3_8b, llama31_8b, llama3_70b, llama31_70b,
                                   llama32_1b, llama32_3b, mistral_7b, ministral_8b, qwen25_0_5b,
                                   qwen25_3b, qwen3_0_6b, qwen3_30b_a3b, mixtral_8x7b, gemma2_2b, gemma2_9b, gemma2_27b, gemma3_1b,
                                   gemma3_4b, gemma3_12b, gemma3_27b)}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset (see PRESETS), with `overrides` applied."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)
