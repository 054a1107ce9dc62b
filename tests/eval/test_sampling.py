"""kto_jax.eval.sampling: the KV-cache sampler against step-by-step full-forward decoding.

The reference decodes each prompt on its own, unpadded, re-running the whole
sequence through `Transformer.__call__` for every new token and taking the argmax of
the last logits. The sampler prefills left-padded prompts of different lengths in
one forward and decodes from its cache; greedy tokens must agree exactly.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kto_jax.eval import sampling as gen
from kto_jax.models import ModelConfig, Transformer
from kto_jax.sharding import make_mesh

PROMPTS = [[5, 9, 3, 17, 22, 8, 1], [4, 30], [11, 2, 40, 7]]
N_NEW = 9
BUFFER = 16  # longest prompt + N_NEW


def _model(**overrides) -> Transformer:
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
                      eos_token_id=None, **overrides)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    # Larger weights than the 0.02 init make the argmax decisive (no near-ties).
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x, params))
    return model


def _tokenizer(eos: int, pad: int = 0):
    return types.SimpleNamespace(eos_token_id=eos, pad_token_id=pad)


def full_forward_greedy(model: Transformer, prompts: list[list[int]], n: int,
                        eos: int | None) -> list[list[int]]:
    """Greedy decoding of each prompt alone by a full forward per token, no padding.

    Each sequence sits at the start of a fixed buffer of BUFFER tokens (one
    compilation); causal attention makes the tokens after position t irrelevant to t.
    """
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(
        x, jnp.arange(x.shape[1], dtype=jnp.int32)[None], jnp.ones_like(x)))
    outs = []
    for prompt in prompts:
        buf = np.zeros((1, BUFFER), np.int32)
        buf[0, :len(prompt)] = prompt
        out = []
        for t in range(len(prompt), len(prompt) + n):
            tok = int(jnp.argmax(forward(params, jnp.asarray(buf))[0, t - 1]))
            out.append(tok)
            buf[0, t] = tok
            if tok == eos:
                break
        outs.append(out)
    return outs


def _unused_token(refs: list[list[int]], vocab: int = 61) -> int:
    return max(set(range(vocab)) - {t for r in refs for t in r})


VARIANTS = {
    "llama": {},
    "qwen3_qknorm": {"architecture": "Qwen3ForCausalLM", "qk_norm": True, "tie_word_embeddings": True},
    "qwen2_bias": {"architecture": "Qwen2ForCausalLM", "attention_bias": True},
    "mistral_window4": {"architecture": "MistralForCausalLM", "sliding_window": 4},
    "ministral_interleaved": {"architecture": "MinistralForCausalLM", "sliding_window": 4,
                              "layer_types": ("sliding_attention", "full_attention")},
    # Gemma: window 4 < the 16-slot cache, so the sliding layers decode from a ring of 4 slots
    # (prompts of 7 tokens are prefilled through it); soft-capped attention and final logits.
    "gemma2_ring": {"architecture": "Gemma2ForCausalLM", "sliding_window": 4, "query_pre_attn_scalar": 12,
                    "attn_logit_softcap": 3.0, "final_logit_softcap": 5.0, "tie_word_embeddings": True,
                    "layer_types": ("sliding_attention", "full_attention")},
    "gemma3_ring": {"architecture": "Gemma3ForCausalLM", "qk_norm": True, "sliding_window": 4,
                    "rope_theta": 1e6, "rope_local_theta": 1e4, "tie_word_embeddings": True,
                    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                    "layer_types": ("sliding_attention", "full_attention")},
    # a mixture of experts: every token of the prefill and of each decode step routed to its 2 of 4
    "qwen3_moe": {"architecture": "Qwen3MoeForCausalLM", "qk_norm": True, "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True},
    # with a dense layer among the sparse ones (mlp_only_layers=[0]): the decode scan's MLP cond
    "qwen3_moe_dense0": {"architecture": "Qwen3MoeForCausalLM", "qk_norm": True, "num_experts": 4,
                         "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True,
                         "dense_mlp_layers": (0,)},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kv_cache_greedy_equals_full_forward(variant):
    model = _model(**VARIANTS[variant])
    refs = full_forward_greedy(model, PROMPTS, N_NEW, None)
    unused_eos = _unused_token(refs)
    sampler = gen.Sampler(model, _tokenizer(unused_eos), batch_size=4, prompt_multiple=8)
    out = sampler.generate_ids(PROMPTS, gen.SamplingSettings(max_new_tokens=N_NEW))
    assert [ids for ids, _ in out] == refs
    assert all(stop is None for _, stop in out)


def test_sliding_layers_keep_a_ring_of_their_window():
    """The cache of a 16-slot decode: global layers keep every slot, sliding layers W = 4
    (Gemma: one of each here, so each stack has a scratch layer for the other kind)."""
    from kto_jax.models.kv_cache import init_kv_cache
    cfg = _model(**VARIANTS["gemma2_ring"]).config
    cache = init_kv_cache(cfg, 3, BUFFER)
    assert cache.k.shape == (2, 3, BUFFER, 2, 8) and cache.ring_k.shape == (2, 3, 4, 2, 8)
    every = init_kv_cache(_model(**VARIANTS["mistral_window4"]).config, 3, BUFFER)
    assert every.k is None and every.ring_k.shape == (2, 3, 4, 2, 8)  # all sliding: no full slots
    wide = init_kv_cache(cfg, 3, 4)  # window not shorter than the cache: no ring
    assert wide.ring_k is None and wide.k.shape == (2, 3, 4, 2, 8)


@pytest.mark.slow
def test_eos_stops_each_row_and_pads_after_it():
    model = _model()
    refs = full_forward_greedy(model, PROMPTS, N_NEW, None)
    eos = refs[0][2]                      # row 0 must stop after 3 tokens
    expected = [r[:r.index(eos) + 1] if eos in r else r for r in refs]  # greedy: a prefix
    assert len(expected[0]) == 3
    sampler = gen.Sampler(model, _tokenizer(eos), batch_size=4, prompt_multiple=8)
    out = sampler.generate_ids(PROMPTS, gen.SamplingSettings(max_new_tokens=N_NEW))
    for (ids, stop), ref in zip(out, expected):
        finished = ref[-1] == eos
        assert stop == (eos if finished else None)
        assert ids == (ref[:-1] if finished else ref)
    # The raw decoder pads after EOS and reports lengths including the EOS token.
    ids, mask = gen.left_pad(PROMPTS, 8, 4, pad_id=0)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens, lengths = gen.decode(graphdef, params, jnp.asarray(ids), jnp.asarray(mask),
                                 jax.random.key(0), settings=gen.SamplingSettings(max_new_tokens=N_NEW),
                                 eos_ids=(eos,), pad_id=0)
    assert int(lengths[0]) == 3 and np.all(np.asarray(tokens[0, 3:]) == 0)
    assert [int(n) for n in lengths[:3]] == [len(r) for r in expected]


def test_sharded_sampler_matches_one_device():
    """Batch over 'data' (4) and kv heads over 'tensor' (2) on the 8 CPU devices."""
    from kto_jax import sharding as shd
    model = _model()
    rules = (("batch", ("data", "fsdp")), ("kv_heads", "tensor"), ("heads", "tensor"), ("mlp", "tensor"))
    mesh = make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    single = gen.Sampler(model, _tokenizer(60), batch_size=4, prompt_multiple=8)
    expected = single.generate_ids(PROMPTS * 2, gen.SamplingSettings(max_new_tokens=N_NEW))
    sharded_model = shd.shard_model(_model(), mesh, rules)
    sampler = gen.Sampler(sharded_model, _tokenizer(60), mesh=mesh, rules=rules, batch_size=3,
                          prompt_multiple=8)
    assert sampler.batch_size == 4       # rounded up to the 4 batch shards
    assert sampler.generate_ids(PROMPTS * 2, gen.SamplingSettings(max_new_tokens=N_NEW)) == expected


def test_filter_logits_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 11)).astype(np.float32)
    out = np.asarray(gen.filter_logits(jnp.asarray(logits), top_k=4, top_p=1.0))
    for row, o in zip(logits, out):
        keep = set(np.argsort(-row)[:4])
        assert all(np.isfinite(o[j]) == (j in keep) for j in range(11))
    out = np.asarray(gen.filter_logits(jnp.asarray(logits), top_k=0, top_p=0.6))
    for row, o in zip(logits, out):
        order = np.argsort(-row)
        p = np.exp(row - row.max())
        p /= p.sum()
        before = np.cumsum(p[order]) - p[order]
        keep = set(order[before < 0.6])
        assert all(np.isfinite(o[j]) == (j in keep) for j in range(11))
        np.testing.assert_allclose(o[list(keep)], row[list(keep)])


@pytest.mark.slow
def test_temperature_sampling_follows_softmax_and_is_seeded():
    """First tokens of 512 copies of one prompt: frequencies vs softmax(logits / T)."""
    model = _model()
    prompt = [5, 9, 3]
    x = jnp.asarray([prompt], jnp.int32)
    logits = np.asarray(model(x, jnp.arange(3)[None], jnp.ones_like(x))[0, -1]) / 2.0
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    graphdef, params = nnx.split(model, nnx.Param)
    ids, mask = gen.left_pad([prompt] * 512, 4, 512, pad_id=0)
    settings = gen.SamplingSettings(max_new_tokens=1, temperature=2.0)

    decode = jax.jit(functools.partial(gen.decode, graphdef, settings=settings, eos_ids=(), pad_id=0))

    def first_tokens(seed):
        tokens, _ = decode(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed))
        return np.asarray(tokens[:, 0])

    first = first_tokens(1)
    freq = np.bincount(first, minlength=61) / len(first)
    assert np.abs(freq - probs).max() < 0.05
    np.testing.assert_array_equal(first, first_tokens(1))
    assert not np.array_equal(first, first_tokens(2))
    sampler = gen.Sampler(model, _tokenizer(60), batch_size=4, prompt_multiple=4)
    top1 = gen.SamplingSettings(max_new_tokens=N_NEW, temperature=0.7, top_k=1)
    greedy = gen.SamplingSettings(max_new_tokens=N_NEW)
    assert sampler.generate_ids(PROMPTS, top1, seed=5) == sampler.generate_ids(PROMPTS, greedy)


def test_sample_cli_on_a_tiny_chat_model(tiny_dir, tmp_path):
    """`kto-jax sample` (8-device data mesh) writes the same greedy completions as a
    one-device Sampler; message lists go through the chat template, strings do not."""
    import json

    from kto_jax import cli
    from kto_jax.models import from_pretrained, load_tokenizer
    from tiny_models import write_prompts
    model_dir = tiny_dir
    prompts = write_prompts(str(tmp_path / "p.jsonl"), 5)
    out = str(tmp_path / "out.jsonl")
    assert cli.main(["sample", "--model", model_dir, "--prompts", str(tmp_path / "p.jsonl"),
                     "--out", out, "--max_new_tokens", "6", "--batch_size", "3", "--raw"]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in rows] == list(range(5)) and [r["prompt"] for r in rows] == prompts
    model, _ = from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    expected = gen.Sampler(model, tok, batch_size=8).generate(prompts, gen.SamplingSettings(max_new_tokens=6))
    assert [r["completion"] for r in rows] == [g.text for g in expected]
    assert [r["num_tokens"] for r in rows] == [len(g.token_ids) for g in expected]
    rendered = gen.render_prompt(tok, prompts[0])
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_start|>assistant\n")
    assert gen.render_prompt(tok, "plain ?") == "plain ?"
    assert gen.render_prompt(tok, "plain ?", chat=True).endswith("<|im_start|>assistant\n")


def test_sample_cli_applies_the_chat_template_warns_without_one_and_reports_empty(tiny_dir, tmp_path,
                                                                                   capsys):
    """Plain-string prompts on a chat model go through its template (as --chat would); a
    tokenizer without a template gets a warning; an empty completion is reported."""
    import json
    import os
    import shutil

    from kto_jax import cli
    from kto_jax.models import from_pretrained, load_tokenizer
    model_dir = shutil.copytree(tiny_dir, str(tmp_path / "model"))  # its config is edited below
    prompts = ["the cat sat ?", "why is the sky blue ?"]
    with open(tmp_path / "p.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    argv = ["sample", "--model", model_dir, "--prompts", str(tmp_path / "p.jsonl"),
            "--max_new_tokens", "5"]
    model, _ = from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    settings = gen.SamplingSettings(max_new_tokens=5)
    chat = gen.Sampler(model, tok, batch_size=8, chat=True).generate(prompts, settings)

    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert [json.loads(line)["completion"] for line in out.out.splitlines()] == [g.text for g in chat]
    assert "applying the tokenizer's chat template to plain-text prompts" in out.err

    # The first prompt's first greedy token becomes an end token: its completion is empty.
    config = json.load(open(os.path.join(model_dir, "config.json")))
    config["eos_token_id"] = [tok.eos_token_id, chat[0].token_ids[0]]
    json.dump(config, open(os.path.join(model_dir, "config.json"), "w"))
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    empty = [i + 1 for i, g in enumerate(chat) if g.token_ids[0] == chat[0].token_ids[0]]
    assert [json.loads(line)["completion"] == "" for line in out.out.splitlines()] == \
        [i + 1 in empty for i in range(len(prompts))]
    assert (f"warning: {len(empty)} of 2 completions are empty (rows "
            f"{', '.join(map(str, empty))}): the model ended them at once") in out.err

    # Without a chat template: the strings go as they are, with a warning.
    for name in ("chat_template.jinja",):
        if os.path.exists(os.path.join(model_dir, name)):
            os.remove(os.path.join(model_dir, name))
    tok_config = json.load(open(os.path.join(model_dir, "tokenizer_config.json")))
    tok_config.pop("chat_template", None)
    json.dump(tok_config, open(os.path.join(model_dir, "tokenizer_config.json"), "w"))
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    raw = gen.Sampler(model, load_tokenizer(model_dir), batch_size=8).generate(prompts, settings)
    assert [json.loads(line)["completion"] for line in out.out.splitlines()] == [g.text for g in raw]
    assert "warning: the tokenizer has no chat template" in out.err
