"""`run_demo(workdir)`: the four phases of kto_jax/demo/pipeline.py, timed and reported."""

from __future__ import annotations

import os
import shutil
import time
from typing import Callable

import numpy as np
from flax import nnx

from kto_jax.demo import pipeline, report, rule
from kto_jax.eval import stats
from kto_jax.eval.logprob_scoring import SequenceScorer
from kto_jax.eval.sampling import Sampler
from kto_jax.train import workdir as layout


def default_model_path() -> str:
    from kto_jax.models.gguf import smollm2_gguf_path
    return str(smollm2_gguf_path())


def run_demo(workdir: str, *, size_name: str = "full", model_path: str | None = None,
             seed: int = 0, lora_rank: int = 0, base_quantization: str = "none",
             log: Callable[[str], None] = print) -> dict:
    """Sample, label, KTO-align, re-sample held-out prompts; returns the results dict.

    `lora_rank` > 0 trains LoRA adapters on the frozen model instead of every weight
    (`pipeline.lora_flags`), on a base stored `base_quantization` ("nf4", "int8": QLoRA);
    the aligned policy is the run's merged export either way (a quantised base's: dequantised
    + the adapters), and the KL is measured against the unquantised model."""
    from kto_jax.models import from_pretrained, load_tokenizer
    size = pipeline.SIZES[size_name]
    model_path = model_path or default_model_path()
    os.makedirs(workdir, exist_ok=True)
    start, timings = time.perf_counter(), {}
    phase = pipeline.Phase(log, timings)
    with phase(f"0/4 load {model_path}"):
        model, _ = from_pretrained(model_path)
        tokenizer = load_tokenizer(model_path)
        sampler = Sampler(model, tokenizer, batch_size=size.sample_batch, prompt_multiple=16)
    train_prompts = pipeline.bundled_prompts("train", size.train_prompts)
    heldout = pipeline.bundled_prompts("heldout", size.heldout_prompts)
    with phase(f"1/4 sample {size.samples_per_prompt} completions for each of {len(train_prompts)} "
               f"training prompts and {size.heldout_samples} for each of {len(heldout)} held-out "
               f"prompts (temperature {pipeline.TEMPERATURE}, at most {size.max_new_tokens} tokens)"):
        train_gens = pipeline.sample(sampler, train_prompts, size.samples_per_prompt, size, seed, log)
        before = pipeline.sample(sampler, heldout, size.heldout_samples, size, seed + 1, log)
    with phase(f"2/4 label them with the rule: {rule.DESCRIPTION}"):
        train_path = os.path.join(workdir, "feedback_train.jsonl")
        eval_path = os.path.join(workdir, "feedback_heldout.jsonl")
        n_up, n_train = pipeline.write_feedback(train_path, train_gens)
        pipeline.write_feedback(eval_path, before)
        log(f"   training feedback: {n_up} thumbs-up, {n_train - n_up} thumbs-down -> {train_path}")
    what = f"LoRA rank {lora_rank} adapters" if lora_rank > 0 else "every weight"
    if lora_rank > 0 and base_quantization != "none":
        what += f" on a {base_quantization} base"
    with phase(f"3/4 KTO-align on that feedback: {size.num_steps} steps of the real trainer ({what})"):
        run_dir = pipeline.run_training(size, model_path, workdir, train_path, eval_path, seed, log,
                                        extra=pipeline.lora_flags(size, lora_rank, base_quantization))
    with phase(f"4/4 re-sample the {len(heldout)} held-out prompts with the aligned policy (same seed)"):
        reference_params = nnx.state(model, nnx.Param)
        policy_params = pipeline.load_policy_params(run_dir)
        sampler.set_params(policy_params)
        after = pipeline.sample(sampler, heldout, size.heldout_samples, size, seed + 1, log)
        kl = kl_estimate(model, tokenizer, after, policy_params, reference_params)
    name = "SmolLM2-135M-Instruct" if model_path.endswith(".gguf") and "SmolLM2" in model_path \
        else os.path.basename(model_path.rstrip("/"))
    return finish(workdir, run_dir, name, size_name, size, before, after, kl, n_train,
                  time.perf_counter() - start, timings, log, lora_rank, base_quantization)


def drop_training_state(workdir: str, run_dir: str) -> None:
    """Deletes what only a resumed run would need (the Orbax checkpoints: most of the disk
    use) and the --smoke model; the report, the plot and run/hf stay."""
    shutil.rmtree(layout.path(run_dir, layout.CHECKPOINT_DIR), ignore_errors=True)
    shutil.rmtree(os.path.join(workdir, "smoke-model"), ignore_errors=True)


def disk_use(directory: str) -> str:
    """Bytes under `directory`, e.g. '540 MB'."""
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory)
                for f in files if not os.path.islink(os.path.join(root, f)))
    return f"{total / 1e6:.0f} MB" if total >= 1e6 else f"{total / 1e3:.0f} kB"


def kl_samples(model, tokenizer, generations, policy_params, reference_params) -> np.ndarray:
    """log pi_theta(y|x) - log pi_ref(y|x) of each sample y ~ pi_theta, in nats: [N].

    Their mean is the Monte-Carlo estimate of KL(pi_theta || pi_ref); their spread gives
    its standard error."""
    scorer = SequenceScorer(model, tokenizer, batch_size=16, length_multiple=16)
    prompts = [g.prompt_ids for g in generations]
    completions = [g.scored_ids for g in generations]
    policy, _ = scorer.logps_ids(prompts, completions, policy_params)
    reference, _ = scorer.logps_ids(prompts, completions, reference_params)
    return np.asarray(policy - reference)


def kl_estimate(model, tokenizer, generations, policy_params, reference_params) -> float:
    """mean over samples y ~ pi_theta of log pi_theta(y|x) - log pi_ref(y|x), in nats."""
    return float(np.mean(kl_samples(model, tokenizer, generations, policy_params, reference_params)))


def finish(workdir, run_dir, model_name, size_name, size, before, after, kl, n_train, seconds,
           timings, log, lora_rank: int = 0, base_quantization: str = "none") -> dict:
    """Prints the table, examples and caveats; writes results.json and the plot."""
    from kto_jax.train.metrics import read_jsonl
    from kto_jax.train.workdir import EVAL_METRICS_FILE
    evals = read_jsonl(os.path.join(run_dir, EVAL_METRICS_FILE))
    eval_metrics = evals[-1] if evals else {}
    b_texts, a_texts = [g.text for g in before], [g.text for g in after]
    rate_before = stats.rate(sum(map(rule.passes, b_texts)), len(b_texts))
    rate_after = stats.rate(sum(map(rule.passes, a_texts)), len(a_texts))
    plot = report.write_plot(run_dir, os.path.join(workdir, report.PLOT_FILE), model_name)
    drop_training_state(workdir, run_dir)
    text = "\n\n".join([
        report.table(rate_before, rate_after, kl, eval_metrics, b_texts, a_texts, size.num_steps),
        report.verdict(rate_before, rate_after),
        "Examples (first sample of the first held-out prompts; up/down = the rule's verdict):\n"
        + report.examples([g.prompt for g in before], b_texts, a_texts, stride=size.heldout_samples),
        report.caveats(model_name, size_name, len(a_texts), n_train, size.num_steps),
        f"Wall time {seconds / 60:.1f} min. Workdir {workdir}, {disk_use(workdir)} on disk: "
        f"results.json" + (f", {report.PLOT_FILE}" if plot else " (no plot: pip install matplotlib)")
        + ", feedback_*.jsonl, run/hf/ (the aligned model, loadable by transformers with torch), "
        "run/metrics.jsonl. The training checkpoints were deleted."])
    log("\n" + text)
    results = {"size": size_name, "rule": rule.DESCRIPTION, "steps": size.num_steps, "lora_rank": lora_rank,
               "base_quantization": base_quantization if lora_rank > 0 else "none",
               "pass_rate_before": rate_before.as_dict(), "pass_rate_after": rate_after.as_dict(),
               "kl_after": kl, "heldout_eval": eval_metrics, "seconds": seconds, "phase_seconds": timings,
               "report": text, "heldout": [{"prompt": b.prompt, "before": b.text, "after": a.text}
                                           for b, a in zip(before, after)]}
    report.write_results(os.path.join(workdir, "results.json"), results)
    return results
