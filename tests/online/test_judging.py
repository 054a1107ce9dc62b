"""Online judges from spec strings: a kto-jax reward model on the training mesh scores
as the one-device one does; a pairwise function is refused; the http spec reads the env."""

import jax
import numpy as np
import pytest

from kto_jax import sharding as shd
from kto_jax.config import config_file
from kto_jax.errors import UserError
from kto_jax.eval.judges import reward_model_judge
from kto_jax.online.http_judge import HTTPPointwiseJudge
from kto_jax.online.judging import make_pointwise_judge
from kto_jax.online.settings import OnlineSettings


def _settings():
    c = config_file("online_tiny_cpu")
    c.online.prompts_path, c.online.judge = "p.jsonl", "online_judge:score"
    return c, OnlineSettings.from_config(c)


def test_reward_model_judge_on_the_training_mesh(tiny_model_dir):
    config, settings = _settings()
    config.mesh.fsdp = 2
    mesh = shd.make_mesh(config.mesh)
    judge = make_pointwise_judge(f"reward-model:{tiny_model_dir}", settings, mesh=mesh,
                                 rules=config.mesh)
    prompts, completions = ["the cat ?", "a dog ran ?"], ["sat on a mat", "the sun"]
    on_mesh = judge.scores(prompts, completions)
    alone = reward_model_judge(tiny_model_dir).scores(prompts, completions)
    np.testing.assert_allclose(on_mesh, alone, rtol=1e-5)
    assert all(s < 0 for s in on_mesh)  # mean log-probs
    scorer_params = judge._score_fn.__closure__  # the scorer lives in the closure
    leaves = [leaf for cell in scorer_params if hasattr(cell.cell_contents, "params")
              for leaf in jax.tree.leaves(cell.cell_contents.params)]
    assert leaves and all(leaf.sharding.mesh.shape == mesh.shape for leaf in leaves)
    assert any(not leaf.sharding.is_fully_replicated for leaf in leaves)  # fsdp-sharded


def test_pairwise_function_is_refused_and_http_reads_the_environment(monkeypatch):
    _, settings = _settings()
    with pytest.raises(UserError, match="compares two answers"):
        make_pointwise_judge("online_judge:compare", settings)
    monkeypatch.setenv("KTO_JAX_JUDGE_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.delenv("KTO_JAX_JUDGE_MODEL", raising=False)
    with pytest.raises(UserError, match="KTO_JAX_JUDGE_MODEL"):
        make_pointwise_judge("http", settings)
    judge = make_pointwise_judge("http:m1", settings)
    assert isinstance(judge, HTTPPointwiseJudge)
    assert (judge.base_url, judge.model, judge.workers, judge.retries) == \
        ("http://127.0.0.1:9/v1", "m1", settings.judge_workers, settings.judge_retries)
