"""What a model family is: the record one module per family fills in.

A family is one Hugging Face architecture (`architectures[0]` in config.json). Its module
in kto_jax/models/families/ builds one `Family` record, registered in that package's
`FAMILIES` table, which says everything the rest of kto-jax needs to know about it:

- the HF config mapping: `read_hf` turns the family's own config.json keys into
  ModelConfig fields (and refuses what is not implemented), `write_hf` writes them back;
- the parameter table: `rows`, our parameter paths against the HF tensor names
  (the row groups below are shared by the families that have those tensors);
- the layer variant: which ModelConfig switches the architecture fixes (`fixed`) or
  lets a checkpoint set (`options`), the norm formula, where the norms sit, the MLP
  block, the embedding scale.

What may differ from layer to layer of one model (a sliding window or global attention,
the RoPE table) is not the family's but the config's: `ModelConfig.layer_kinds`,
which the layer scan carries as a scanned index (kto_jax/models/transformer.py).
docs/models.md "Adding a family" walks through a new family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from kto_jax.models.layers import GATED_MLP, MlpBlock, rms_norm

# ---- the parameter table's vocabulary (the transforms' math: kto_jax/models/params.py) ----

# transform name: HF tensor <-> our layout (per layer)
IDENTITY = "identity"   # norms, embedding: same layout
LINEAR = "linear"       # HF [out, in] -> ours [in, out]
HEADS_IN = "heads_in"   # HF [N*hd, D] -> ours [D, N, hd]   (q/k/v projections)
HEADS_OUT = "heads_out"  # HF [D, H*hd] -> ours [H, hd, D]  (o_proj)
HEADS_BIAS = "heads_bias"  # HF [N*hd] -> ours [N, hd]      (q/k/v bias)
EXPERT_LINEAR = "expert_linear"  # one HF [out, in] per expert -> ours [E, in, out] (its slice [in, out])


@dataclasses.dataclass(frozen=True)
class ParamRow:
    """One parameter: our state path, its HF name and the transform between the layouts."""

    path: tuple[str, ...]
    hf_name: str
    transform: str

    @property
    def stacked(self) -> bool:
        """True for decoder-layer parameters: HF has one tensor per layer, we stack them."""
        return "{i}" in self.hf_name

    @property
    def per_expert(self) -> bool:
        """True for an expert weight: HF has one tensor per layer and expert ('{e}'), we
        stack them [L, E, ...]."""
        return "{e}" in self.hf_name

    def hf_names(self, num_layers: int, num_experts: int | None = None,
                 layers: tuple[int, ...] | None = None) -> list[str]:
        """Every HF name of the row: layer-major, then expert ({e}: 0 .. num_experts - 1);
        `layers`: the layers the row stacks (ModelConfig.stack_layers), default all."""
        if not self.stacked:
            return [self.hf_name]
        experts = range(num_experts or 0) if self.per_expert else (0,)
        layers = range(num_layers) if layers is None else layers
        return [self.hf_name.format(i=i, e=e) for i in layers for e in experts]


def layer_row(name: str, hf_suffix: str, transform: str, prefix: str = "model.layers.{i}.") -> ParamRow:
    """The row of a stacked layer parameter `name`, HF `{prefix}{hf_suffix}` per layer i."""
    return ParamRow(("layers", name), prefix + hf_suffix, transform)


def moved(rows: tuple[ParamRow, ...], old: str, new: str) -> tuple[ParamRow, ...]:
    """`rows` with the HF name prefix `old` replaced by `new` (a language model that sits
    under a prefix of a multimodal checkpoint: "model." -> "model.language_model.")."""
    return tuple(dataclasses.replace(r, hf_name=new + r.hf_name.removeprefix(old))
                 if r.hf_name.startswith(old) else r for r in rows)


BASE_ROWS = (  # Llama's layer: every family starts from these (or names its own)
    ParamRow(("embed_tokens",), "model.embed_tokens.weight", IDENTITY),
    ParamRow(("norm",), "model.norm.weight", IDENTITY),
    layer_row("input_layernorm", "input_layernorm.weight", IDENTITY),
    layer_row("q_proj", "self_attn.q_proj.weight", HEADS_IN),
    layer_row("k_proj", "self_attn.k_proj.weight", HEADS_IN),
    layer_row("v_proj", "self_attn.v_proj.weight", HEADS_IN),
    layer_row("o_proj", "self_attn.o_proj.weight", HEADS_OUT),
    layer_row("post_attention_layernorm", "post_attention_layernorm.weight", IDENTITY),
    layer_row("gate_proj", "mlp.gate_proj.weight", LINEAR),
    layer_row("up_proj", "mlp.up_proj.weight", LINEAR),
    layer_row("down_proj", "mlp.down_proj.weight", LINEAR),
)
QKV_BIAS_ROWS = (  # config.attention_bias
    layer_row("q_bias", "self_attn.q_proj.bias", HEADS_BIAS),
    layer_row("k_bias", "self_attn.k_proj.bias", HEADS_BIAS),
    layer_row("v_bias", "self_attn.v_proj.bias", HEADS_BIAS),
)
QK_NORM_ROWS = (  # config.qk_norm
    layer_row("q_norm", "self_attn.q_norm.weight", IDENTITY),
    layer_row("k_norm", "self_attn.k_norm.weight", IDENTITY),
)
UNTIED_HEAD_ROWS = (ParamRow(("lm_head",), "lm_head.weight", LINEAR),)  # not config.tie_word_embeddings


def moe_rows(block: str, gate: str, up: str, down: str) -> tuple[ParamRow, ...]:
    """The router and expert rows of a mixture-of-experts layer whose HF module is `block`
    (Qwen3-MoE "mlp", Mixtral "block_sparse_moe"), its experts' projections named gate, up, down."""
    return (layer_row("router", f"{block}.gate.weight", LINEAR),
            layer_row("expert_gate_proj", f"{block}.experts.{{e}}.{gate}.weight", EXPERT_LINEAR),
            layer_row("expert_up_proj", f"{block}.experts.{{e}}.{up}.weight", EXPERT_LINEAR),
            layer_row("expert_down_proj", f"{block}.experts.{{e}}.{down}.weight", EXPERT_LINEAR))


ATTENTION_ROWS = tuple(r for r in BASE_ROWS if r.path[-1] not in ("gate_proj", "up_proj", "down_proj"))
SANDWICH_NORM_ROWS = (  # Gemma 2 and 3: a norm after attention and before and after the MLP
    layer_row("pre_feedforward_layernorm", "pre_feedforward_layernorm.weight", IDENTITY),
    layer_row("post_feedforward_layernorm", "post_feedforward_layernorm.weight", IDENTITY),
)


# ---- the layer variant ----

@dataclasses.dataclass(frozen=True)
class NormPlacement:
    """Our parameter names of a layer's norms, by where they sit; None: no norm there.

    Every layer is h + [after_attention](attention(before_attention(h))), then
    h + [after_mlp](mlp(before_mlp(h))). Our names are the family's HF names (Llama
    calls the norm before the MLP `post_attention_layernorm`; Gemma calls that one
    `pre_feedforward_layernorm` and its norm after attention `post_attention_layernorm`).
    """

    before_attention: str = "input_layernorm"
    before_mlp: str = "post_attention_layernorm"
    after_attention: str | None = None
    after_mlp: str | None = None

    def names(self) -> tuple[str, ...]:
        """The norm parameters of a layer, in creation order."""
        return tuple(n for n in (self.before_attention, self.before_mlp, self.after_attention,
                                 self.after_mlp) if n)


def no_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """`read_hf` of a family with no config.json keys of its own."""
    del hf
    return {}


def no_keys(config: Any) -> dict[str, Any]:
    """`write_hf` of a family with no config.json keys of its own."""
    del config
    return {}


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One HF architecture: its config mapping, parameter table and layer variant.

    `read_hf` and `write_hf` see only the family's own config.json keys; the keys every
    family shares (sizes, RoPE, eps, token ids, tied embeddings, hidden_act) are read and
    written by ModelConfig itself. `write_hf` receives the ModelConfig.
    """

    architecture: str                      # HF architectures[0], e.g. "Qwen2ForCausalLM"
    model_type: str                        # HF model_type, e.g. "qwen2"
    rows: tuple[ParamRow, ...]             # HF <-> our parameters (params.param_table adds an untied lm_head)
    read_hf: Callable[[Mapping[str, Any]], dict[str, Any]] = no_fields  # config.json -> ModelConfig fields
    write_hf: Callable[[Any], dict[str, Any]] = no_keys                  # ModelConfig -> config.json keys
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # switches the architecture fixes
    options: tuple[str, ...] = ()          # feature fields (config.FEATURES) a checkpoint may set
    norm: Callable[[Any, Any, float], Any] = rms_norm  # the norm formula (layers, q/k norm, final norm)
    norms: NormPlacement = NormPlacement()  # which norms a layer has and where
    mlp: MlpBlock = GATED_MLP              # the MLP block (a mixture of experts is another block)
    embed_scale: bool = False              # scale the embedding by sqrt(hidden_size), in the compute dtype
    norm_init: float = 1.0                 # a norm weight's random-init value, the one that scales by 1
                                           # (Llama's w * x: 1; Gemma's (1 + w) * x: 0)
    hf_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # ^ config.json values the HF config class assumes when a key is absent (Gemma's tied
    #   embeddings, head_dim 256, ...): read as if written
    text_config_key: str | None = None     # a multimodal config.json: the key of the language model's
    text_model_type: str | None = None     # config ("text_config") and that config's model_type
    passthrough: tuple[str, ...] = ()      # HF tensor-name prefixes not trained, copied through on
                                           # export bit for bit (a vision tower, a projector)
    dense_mlp_rows: tuple[ParamRow, ...] = ()  # a mixture of experts with dense layers
    # (ModelConfig.dense_mlp_layers): the rows of their MLP, added to `rows` (params.param_table)
    legacy_prefixes: tuple[tuple[str, str], ...] = ()
    # ^ (older spelling, ours) of tensor-name prefixes: a checkpoint written in the older
    #   spelling is read through the renaming, and exported in its own spelling again
