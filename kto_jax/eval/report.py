"""`kto-jax eval` as a library call: reward metrics and judged winrate of one policy.

    result = evaluate(config, policy_path=..., reference_path=..., data_path=...,
                      judge=make_judge("module:fn"), settings=SamplingSettings(...))
    print(format_report(result))

The policy and the reference share the run's mesh and rule table (config.mesh);
the reward metrics need the reference (the run's config.model.path), the winrate
needs a judge. Either part can be skipped.
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections
from flax import nnx

from kto_jax import sharding as shd
from kto_jax.eval import rewards, winrate
from kto_jax.eval.judges import Judge
from kto_jax.eval.loading import load_model
from kto_jax.eval.sampling import Sampler, SamplingSettings

REWARD_KEYS = ("rewards/accuracy", "rewards/margins", "rewards/desirable", "rewards/undesirable",
               "kl", "reference_point", "loss", "examples")


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
    """A ConfigDict from a saved config.json (JSON lists back to tuples)."""
    def tuples(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x
    return ml_collections.ConfigDict(tuples(d))


def evaluate(config: ml_collections.ConfigDict, *, policy_path: str, reference_path: str | None,
             data_path: str, judge: Judge | None, settings: SamplingSettings, seed: int = 0,
             batch_size: int = 16, limit: int | None = None, log=print) -> dict:
    """Reward metrics (when reference_path) and winrate (when judge) of the policy on data_path."""
    config = copy.deepcopy(config)
    mesh = shd.make_mesh(config.mesh)
    rules = config.mesh.rules
    policy, tokenizer, resolved = load_model(policy_path, mesh=mesh, rules=rules,
                                             dtype=config.model.param_dtype)
    result: dict = {"policy": resolved, "data": data_path}
    if reference_path:
        log(f"reward metrics: policy {resolved} vs reference {reference_path} on {data_path}")
        reference, _, _ = load_model(reference_path, mesh=mesh, rules=rules,
                                     dtype=config.reference.param_dtype)
        result["rewards"] = policy_reward_metrics(config, policy, reference, tokenizer, data_path, mesh)
        result["reference"] = reference_path
        del reference
    if judge is not None:
        targets, skipped = winrate.reference_targets(data_path, score_threshold=config.data.score_threshold,
                                                     limit=limit)
        log(f"winrate: {len(targets)} prompts with a reference completion ({skipped} without), "
            f"judge {judge.name}")
        sampler = Sampler(policy, tokenizer, mesh=mesh, rules=rules, batch_size=batch_size)
        result["winrate"] = winrate.generate_and_judge(sampler, judge, targets, settings, seed).as_dict()
    return result


def policy_reward_metrics(config: ml_collections.ConfigDict, policy: nnx.Module, reference: nnx.Module,
                          tokenizer: Any, data_path: str, mesh) -> dict:
    """`rewards.reward_metrics` of two loaded models over every row of data_path."""
    from kto_jax.step.state import batch_sharding
    from kto_jax.train import batches as batches_lib
    c = rewards.eval_config(config, data_path)
    batches, _ = rewards.feedback_batches(config, tokenizer, data_path)
    graphdef, policy_params = nnx.split(policy, nnx.Param)
    _, reference_params = nnx.split(reference, nnx.Param)
    sharding = batch_sharding(mesh, c.mesh.rules)
    return rewards.reward_metrics(c, graphdef, policy_params, reference_params, batches,
                                  to_device=lambda b: batches_lib.to_global(b, sharding))


def format_report(result: dict) -> str:
    """A short human-readable summary of `evaluate`'s result."""
    lines = [f"policy: {result['policy']}", f"data:   {result['data']}"]
    if "rewards" in result:
        r = result["rewards"]
        lines.append(f"reward metrics (loss {r.get('reward_loss')}, reference {result['reference']}):")
        for key in REWARD_KEYS:
            if r.get(key) is not None:
                lines.append(f"  {key:<22} {r[key]:.4f}" if isinstance(r[key], float)
                             else f"  {key:<22} {r[key]}")
    if "winrate" in result:
        w = result["winrate"]["winrate"]
        pct = round(100 * w["confidence"])
        lines.append(f"winrate vs reference completions ({result['winrate']['judge']}): "
                     f"{100 * w['rate']:.1f}% [{100 * w['low']:.1f}, {100 * w['high']:.1f}] "
                     f"({pct}% Wilson CI, n={w['n']}; ties count 1/2)")
    return "\n".join(lines)
