"""`kto-jax demo --online`: the demo's budget spent in online rounds instead of one pass.

The offline demo (kto_jax/demo/run.py) samples every training prompt once, judges all
samples with the rule, trains `size.num_steps` steps, and judges the held-out prompts
before and after. This one spends the SAME budget through `kto-jax online`
(kto_jax/online/): `rounds` rounds, each sampling a 1/rounds share of the training
prompts from the current policy, judging them with the same rule (a `module:function`
judge, kto_jax.demo.rule:score) and training num_steps / rounds steps; the held-out
prompts are judged before round 1 and after the last round only (online.heldout_every
= 0). Judge calls and optimizer steps are the offline demo's exactly; the table puts
the two side by side when the offline results.json of the same size is given.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from kto_jax.demo import pipeline
from kto_jax.errors import UserError

ROUNDS = {"full": 4, "quick": 2}


def write_prompts(path: str, prompts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps({"prompt": pipeline.as_messages(prompt)}) + "\n")


def online_overrides(size: pipeline.DemoSize, rounds: int, train_prompts: str,
                     heldout_prompts: str, seed: int) -> list[str]:
    """The --config.online.* flags with the offline demo's judge-call and step budget."""
    if size.train_prompts % rounds or size.num_steps % rounds:
        raise UserError(f"{rounds} rounds must divide the demo's {size.train_prompts} prompts and "
                        f"{size.num_steps} steps")
    if size.heldout_samples != size.samples_per_prompt:
        raise UserError("the online demo samples held-out and training prompts alike: the size "
                        "needs heldout_samples == samples_per_prompt")
    return [f"--config.online.prompts_path={train_prompts}",
            f"--config.online.heldout_prompts_path={heldout_prompts}",
            "--config.online.judge=kto_jax.demo.rule:score", "--config.online.threshold=0.5",
            f"--config.online.rounds={rounds}",
            f"--config.online.prompts_per_round={size.train_prompts // rounds}",
            f"--config.online.samples_per_prompt={size.samples_per_prompt}",
            f"--config.online.steps_per_round={size.num_steps // rounds}",
            f"--config.online.max_new_tokens={size.max_new_tokens}",
            f"--config.online.temperature={pipeline.TEMPERATURE}",
            f"--config.online.sample_batch_size={size.sample_batch}",
            f"--config.online.seed={seed}", "--config.online.heldout_every=0",
            "--config.loss.auto_weights=False"]


def run_online_demo(workdir: str, *, size_name: str = "full", model_path: str | None = None,
                    seed: int = 0, lora_rank: int = 0, log: Callable[[str], None] = print) -> dict:
    """The online rounds on the demo's model, prompts, rule and budget; returns the
    results (pass rate before/after with 90% intervals, KL, margin, judge calls, steps).
    `lora_rank` > 0 trains LoRA adapters in the rounds (`pipeline.lora_flags`)."""
    from kto_jax.config import load_config
    from kto_jax.demo.run import default_model_path
    from kto_jax.online.runner import online
    from kto_jax.train.metrics import read_jsonl
    from kto_jax.train.workdir import METRICS_FILE
    size = pipeline.SIZES[size_name]
    rounds = ROUNDS[size_name]
    model_path = model_path or default_model_path()
    os.makedirs(workdir, exist_ok=True)
    train_prompts = os.path.join(workdir, "train_prompts.jsonl")
    heldout_prompts = os.path.join(workdir, "heldout_prompts.jsonl")
    write_prompts(train_prompts, pipeline.bundled_prompts("train", size.train_prompts))
    write_prompts(heldout_prompts, pipeline.bundled_prompts("heldout", size.heldout_prompts))
    base = [f for f in pipeline.train_overrides(size, model_path, "", "", seed)
            if not f.startswith(("--config.data.train_path", "--config.data.eval_path",
                                 "--config.loss.auto_weights", "--config.checkpoint.every_steps"))]
    argv = [f"--config={pipeline.config_path()}", *base,
            *online_overrides(size, rounds, train_prompts, heldout_prompts, seed),
            *pipeline.lora_flags(size, lora_rank)]
    run_dir = os.path.join(workdir, "online")
    log("kto-jax demo --online: the same as: kto-jax online " + " ".join(argv)
        + f" --workdir={run_dir}")
    config, _, _ = load_config(argv)
    online(config, run_dir)
    rows = [r for r in read_jsonl(os.path.join(run_dir, METRICS_FILE)) if r.get("kind") == "round"]
    first, last = rows[0], rows[-1]
    judge_calls = sum(len(read_jsonl(os.path.join(run_dir, "rounds", f"{r['round']:04d}", name)))
                      for r in rows for name in ("samples.jsonl", "heldout.jsonl")
                      if os.path.exists(os.path.join(run_dir, "rounds", f"{r['round']:04d}", name)))
    results = {"size": size_name, "rounds": rounds, "steps": size.num_steps, "lora_rank": lora_rank,
               "judge_calls": judge_calls,
               "pass_rate_before": [first[k] for k in ("judge/pass_rate", "judge/pass_rate_low",
                                                       "judge/pass_rate_high")],
               "pass_rate_after": [last[k] for k in ("judge/pass_rate", "judge/pass_rate_low",
                                                     "judge/pass_rate_high")],
               "n": last["judge/n"], "kl_after": last["kl_ref"],
               "margin_after": last["heldout/rewards_margins"]}
    fmt = lambda v: f"{100 * v[0]:.1f}% [{100 * v[1]:.1f}, {100 * v[2]:.1f}] (n={results['n']})"
    log("\n| online KTO | before | after |\n| --- | --- | --- |\n"
        f"| judge pass rate, held-out (90% CI) | {fmt(results['pass_rate_before'])} | "
        f"{fmt(results['pass_rate_after'])} |\n"
        f"| KL(policy || reference), nats | 0 (same model) | {results['kl_after']:.3f} |\n"
        f"| judge calls, optimizer steps | | {judge_calls}, {size.num_steps} ({rounds} rounds) |")
    with open(os.path.join(workdir, "online_results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results
