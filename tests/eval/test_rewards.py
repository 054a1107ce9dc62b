"""Reward metrics of kto-jax eval against log-probs computed independently, row by row.

The reference computation renders each row with the chat template itself, runs the
full model forward on the unpadded sequence and sums log-softmax over the
completion tokens; the eval path goes through the data pipeline, padded batches and
the train step's forwards.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kto_jax.config import load_config
from kto_jax.eval import report, rewards
from kto_jax.models import from_pretrained, load_tokenizer
from kto_jax.sharding import make_mesh

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny_cpu.py")
BETA = 0.2


@pytest.fixture(scope="module")
def models(tiny_dir):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    reference, _ = from_pretrained(tiny_dir, mesh=mesh)
    policy, _ = from_pretrained(tiny_dir, mesh=mesh)
    params = nnx.state(policy, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(policy, jax.tree.unflatten(tree, noisy))
    return policy, reference, load_tokenizer(tiny_dir), mesh


def _config(tiny_dir, loss="kto"):
    config, _, _ = load_config([f"--config={CONFIG}", f"--config.model.path={tiny_dir}",
                                f"--config.loss.name={loss}", f"--config.loss.beta={BETA}",
                                "--config.data.max_length=128", "--config.data.max_prompt_length=64",
                                "--config.data.bucket_lengths=(64,)"])
    return config


_FORWARDS = {}


def _logp(model, tok, prompt_msgs, completion_msgs) -> float:
    """log pi(y|x) of one row, unpadded: the sequence sits at the start of a fixed
    128-token buffer (one compilation); causal attention ignores what follows it."""
    prompt = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False)
    x = tok(prompt, add_special_tokens=False)["input_ids"]
    y = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
    if id(model) not in _FORWARDS:
        graphdef, state = nnx.split(model)
        _FORWARDS[id(model)] = (jax.jit(lambda s, ids: jax.nn.log_softmax(nnx.merge(graphdef, s)(
            ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids))[0], -1)), state)
    forward, state = _FORWARDS[id(model)]
    ids = np.zeros((1, 128), np.int32)
    ids[0, :len(x) + len(y)] = x + y
    logp = np.asarray(forward(state, jnp.asarray(ids)), np.float64)
    return float(sum(logp[len(x) + j - 1, t] for j, t in enumerate(y)))


def test_unpaired_reward_metrics_match_row_by_row(tiny_dir, models, tmp_path):
    from tiny_models import write_unpaired_feedback
    policy, reference, tok, mesh = models
    path = str(tmp_path / "heldout.jsonl")
    write_unpaired_feedback(path, 14, seed=3)
    out = report.policy_reward_metrics(_config(tiny_dir), policy, reference, tok, path, mesh)
    rows = [json.loads(line) for line in open(path)]
    r = np.array([_logp(policy, tok, row["prompt"], row["completion"])
                  - _logp(reference, tok, row["prompt"], row["completion"]) for row in rows])
    label = np.array([row["label"] for row in rows])
    assert out["examples"] == len(rows)
    assert out["rewards/desirable"] == pytest.approx(BETA * r[label].mean(), abs=1e-4)
    assert out["rewards/undesirable"] == pytest.approx(BETA * r[~label].mean(), abs=1e-4)
    assert out["rewards/margins"] == pytest.approx(BETA * (r[label].mean() - r[~label].mean()), abs=1e-4)
    assert 0.0 <= out["rewards/accuracy"] <= 1.0 and out["kl"] >= 0.0
    # The policy as its own reference: r = z0 = 0 everywhere, so no example is on its side.
    same = report.policy_reward_metrics(_config(tiny_dir), reference, reference, tok, path, mesh)
    assert same["rewards/accuracy"] == 0.0 and same["rewards/margins"] == 0.0 and same["kl"] == 0.0


def test_paired_reward_accuracy_matches_row_by_row(tiny_dir, models, tmp_path):
    from tiny_models import sentence
    import random
    policy, reference, tok, mesh = models
    rng = random.Random(5)
    path = str(tmp_path / "pairs.jsonl")
    rows = [{"prompt": [{"role": "user", "content": sentence(rng, 2, 5) + " ?"}],
             "chosen": [{"role": "assistant", "content": sentence(rng, 2, 6)}],
             "rejected": [{"role": "assistant", "content": sentence(rng, 2, 6)}]} for _ in range(8)]
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    out = report.policy_reward_metrics(_config(tiny_dir, "dpo"), policy, reference, tok, path, mesh)

    def r(row, side):
        return (_logp(policy, tok, row["prompt"], row[side])
                - _logp(reference, tok, row["prompt"], row[side]))
    margins = np.array([r(row, "chosen") - r(row, "rejected") for row in rows])
    assert out["rewards/accuracy"] == pytest.approx(np.mean(margins > 0))
    assert out["rewards/margins"] == pytest.approx(BETA * margins.mean(), abs=1e-4)
    assert out["reward_loss"] == "dpo"
