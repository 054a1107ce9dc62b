"""The demo loop a KTO user runs, end to end, on a real model:

  1. sample completions for the bundled training prompts (and the held-out ones);
  2. label each thumbs-up / thumbs-down with the rule of kto_jax/demo/rule.py;
  3. KTO-align on that feedback with the real trainer (`kto_jax.train.trainer.train`,
     what `kto-jax train` runs, config configs/smollm2_135m_kto.py plus overrides
     printed as the equivalent command line);
  4. re-sample the HELD-OUT prompts with the aligned policy, same seed, and compare.

Everything is seeded (sampling, data order), so a re-run prints the same numbers on
the same machine type. Sizes: 'full' (SmolLM2-135M on a 2-core CPU in minutes) and
'quick' (a smoke test, meant for tiny models).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import tempfile
import time
from typing import Any, Callable

from flax import nnx

from kto_jax.demo import rule
from kto_jax.errors import UserError
from kto_jax.eval.sampling import Generation, Sampler, SamplingSettings

TEMPERATURE = 1.0  # plain samples of the policy: the feedback is on-policy, and the KL estimate unbiased


@dataclasses.dataclass(frozen=True)
class DemoSize:
    train_prompts: int        # of the 80 bundled training prompts
    samples_per_prompt: int   # completions per training prompt (the feedback set)
    heldout_prompts: int      # of the 32 bundled held-out prompts
    heldout_samples: int      # completions per held-out prompt, before and after
    max_new_tokens: int       # generated tokens (the rule needs only the opening sentence)
    batch_size: int           # examples per optimizer step (one microbatch)
    lr: float                 # peak learning rate, after `warmup` steps
    warmup: int
    sample_batch: int         # prompts per generation batch
    steps: int = 0            # optimizer steps; 0: one pass over the training feedback

    @property
    def num_steps(self) -> int:
        return self.steps or max(1, self.train_prompts * self.samples_per_prompt // self.batch_size)


SIZES = {
    "full": DemoSize(80, 2, 32, 2, 40, 8, 2e-5, 2, 32),
    "quick": DemoSize(16, 1, 8, 1, 8, 8, 1e-3, 1, 16),
}


@dataclasses.dataclass
class Phase:
    """Prints a numbered phase and its duration."""
    log: Callable[[str], None]
    timings: dict

    def __call__(self, name: str):
        return _PhaseTimer(self, name)


class _PhaseTimer:
    def __init__(self, phase: Phase, name: str):
        self.phase, self.name = phase, name

    def __enter__(self):
        self.start = time.perf_counter()
        self.phase.log(f"\n== {self.name}")
        return self

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self.start
        self.phase.timings[self.name] = seconds
        if exc[0] is None:
            self.phase.log(f"   ({seconds:.0f}s)")


def bundled_prompts(split: str, limit: int) -> list[str]:
    """The first `limit` prompts of the bundled 'train' (80) or 'heldout' (32) set."""
    text = importlib.resources.files("kto_jax.demo").joinpath("data", f"{split}_prompts.jsonl").read_text("utf-8")
    prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    return prompts[:limit]


def as_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def repeat(prompts: list, k: int) -> list:
    """Each prompt k times in a row (p0, p0, p1, p1, ...)."""
    return [p for p in prompts for _ in range(k)]


def write_feedback(path: str, generations: list[Generation]) -> tuple[int, int]:
    """Unpaired conversational feedback rows {prompt, completion, label}; returns (n_up, n)."""
    up = 0
    with open(path, "w", encoding="utf-8") as f:
        for g in generations:
            label = rule.passes(g.text)
            up += label
            f.write(json.dumps({"prompt": g.prompt, "completion": [{"role": "assistant", "content": g.text}],
                                "label": label}) + "\n")
    return up, len(generations)


def config_path() -> str:
    """configs/smollm2_135m_kto.py of the source checkout (the README installs with -e)."""
    import kto_jax
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(kto_jax.__file__))),
                        "configs", "smollm2_135m_kto.py")
    if not os.path.isfile(path):
        raise UserError(f"the demo reads {path}, which is missing: install kto-jax from a source "
                        "checkout with `pip install -e .[demo]` as the README says")
    return path


def train_overrides(size: DemoSize, model_path: str, train_path: str, eval_path: str,
                    seed: int) -> list[str]:
    """The --config.* flags the demo adds to configs/smollm2_135m_kto.py."""
    completion = size.max_new_tokens  # a completion cut at max_new_tokens keeps no end token
    max_prompt = 64   # the shapes are chosen from the sampled data (kto_jax/data/shapes.py)
    return [f"--config.model.path={model_path}", f"--config.data.train_path={train_path}",
            f"--config.data.eval_path={eval_path}", f"--config.data.seed={seed}",
            f"--config.data.max_prompt_length={max_prompt}",
            f"--config.data.max_completion_length={completion}",
            f"--config.data.max_length={max_prompt + completion}",
            f"--config.train.num_steps={size.num_steps}",
            f"--config.train.global_batch_size={size.batch_size}",
            f"--config.train.micro_batch_size={size.batch_size}",
            f"--config.optim.lr={size.lr}", f"--config.optim.warmup_steps={size.warmup}",
            "--config.loss.auto_weights=True", "--config.train.log_every=1",
            f"--config.train.eval_every={size.num_steps}",
            f"--config.checkpoint.every_steps={size.num_steps}", "--config.checkpoint.async_save=False"]


LORA_LR_FACTOR = 10.0  # LoRA adapters train at ~10x the full-parameter rate (PEFT/TRL practice)


def lora_flags(size: DemoSize, rank: int, base_quantization: str = "none") -> tuple[str, ...]:
    """The --config flags of the demo's LoRA variant (`kto-jax demo --lora`): adapters of
    `rank` on every projection, at LORA_LR_FACTOR times the size's learning rate; with
    `base_quantization` "nf4" (NF4 + double quantisation, QLoRA's) or "int8", on a quantised
    frozen base (`kto-jax demo --lora --base-quantization=nf4`)."""
    if rank <= 0:
        return ()
    quantized = ()
    if base_quantization != "none":
        quantized = (f"--config.lora.base_quantization={base_quantization}",
                     f"--config.lora.double_quant={base_quantization == 'nf4'}")
    return (f"--config.lora.rank={rank}", f"--config.lora.alpha={2.0 * rank}",
            f"--config.optim.lr={size.lr * LORA_LR_FACTOR}", *quantized)


def run_training(size: DemoSize, model_path: str, workdir: str, train_path: str, eval_path: str,
                 seed: int, log: Callable[[str], None], extra: tuple[str, ...] = (),
                 run_name: str = "run") -> str:
    """`kto-jax train` in-process on the feedback files; returns the run directory.

    `extra` are more --config.KEY=VALUE flags; they replace the demo's own for the same KEY.
    """
    from kto_jax.config import load_config
    from kto_jax.train.trainer import train
    run_dir = os.path.join(workdir, run_name)
    replaced = {flag.split("=", 1)[0] for flag in extra}
    base = [f for f in train_overrides(size, model_path, train_path, eval_path, seed)
            if f.split("=", 1)[0] not in replaced]
    argv = [f"--config={config_path()}", *base, *extra]
    log("   the same as: kto-jax train " + " ".join(argv + [f"--workdir={run_dir}"]))
    config, _, _ = load_config(argv)
    train(config, run_dir)
    return run_dir


def load_policy_params(run_dir: str, step: int | None = None) -> Any:
    """The aligned policy's nnx.Param state: the run's HF export (WORKDIR/run/hf), or with
    `step` its checkpoint of that step (exported to a temporary directory, then removed)."""
    from kto_jax.models import from_pretrained
    from kto_jax.train.workdir import HF_DIR
    if step is None:
        policy, _ = from_pretrained(os.path.join(run_dir, HF_DIR))
        return nnx.state(policy, nnx.Param)
    from kto_jax.train.export import export_checkpoint
    with tempfile.TemporaryDirectory(prefix=f"hf-step-{step}-", dir=run_dir) as out:
        export_checkpoint(run_dir, out, step=step)
        policy, _ = from_pretrained(out)
        return nnx.state(policy, nnx.Param)


def sample(sampler: Sampler, prompts: list[str], k: int, size: DemoSize, seed: int,
           log: Callable[[str], None] | None = None) -> list[Generation]:
    """k completions per prompt (temperature 1, at most size.max_new_tokens tokens)."""
    settings = SamplingSettings(max_new_tokens=size.max_new_tokens, temperature=TEMPERATURE)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if log is not None:
            log(f"   {done}/{total} completions ({time.perf_counter() - start:.0f}s)")

    return sampler.generate(repeat([as_messages(p) for p in prompts], k), settings, seed=seed,
                            progress=progress)
