"""Helpers for trainer tests: tiny model and data writers, CLI subprocess plumbing.

Nothing comes from a hub: the tokenizer is a byte-level BPE trained here on the
helpers' own sentences (vocab < 512), the model a 2-layer Llama (hidden 32)
initialised by transformers with a fixed torch seed and saved with
`save_pretrained`, which is what `--config.model.path` of configs/tiny_cpu.py expects.
"""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

WORDS = ("the cat dog sat ran on a mat log red blue big small happy sad tree house car "
         "road sun moon star sky good bad fast slow yes no what why how when where who").split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_tokenizer(out_dir: str, corpus: list[str]) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=320, min_frequency=1,
                            special_tokens=["<pad>", "<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(out_dir)


def write_tiny_llama(out_dir: str, vocab_size: int, seed: int = 0) -> None:
    import torch
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out_dir)


def write_tiny_model_dir(out: str) -> str:
    """An HF directory (config.json, model.safetensors, tokenizer files) of a tiny Llama
    whose tokenizer is trained on `sentence`s; returns `out`."""
    from transformers import AutoTokenizer
    rng = random.Random(0)
    write_tokenizer(out, [sentence(rng, 3, 12) + " ?" for _ in range(400)])
    write_tiny_llama(out, vocab_size=len(AutoTokenizer.from_pretrained(out)))
    return out


def write_feedback(path: str, n: int, seed: int) -> None:
    """Unpaired feedback rows {prompt, completion, label}, both classes well mixed."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {"prompt": sentence(rng, 2, 6) + " ?", "completion": sentence(rng, 2, 8),
                   "label": bool(i % 3)}
            f.write(json.dumps(row) + "\n")


# ---- running `kto-jax train` in subprocesses ----

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny_cpu.py")
NUM_STEPS = 12  # long enough that a kill after the first checkpoint lands mid-run


def cli_env(cache_dir: str, devices: int = 4, **extra: str) -> dict:
    """Environment of a CLI subprocess: `devices` CPU devices, a shared compilation cache."""
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONPATH=REPO)
    env.update(extra)
    return env


def train_argv(workdir: str, model_dir: str, data_file: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kto_jax.cli", "train", f"--config={TINY_CONFIG}",
            f"--workdir={workdir}", f"--config.model.path={model_dir}",
            f"--config.data.train_path={data_file}", f"--config.train.num_steps={NUM_STEPS}",
            *extra]


def run_cli(argv: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


PACKING = ("--config.data.packing=True", "--config.data.pack_length=128")


def assert_metrics_like(workdir: str, reference_run: str, *, logs=("metrics.jsonl",),
                        first_step_accuracy: bool = True) -> None:
    """Every logged value of `workdir` equals the reference run's: counts and token totals
    exactly, floats within float32 rounding (rewards and KL are differences of log-probs of
    magnitude ~60, ulp ~4e-6: atol 2e-5). `first_step_accuracy=False` skips rewards/accuracies
    at step 1, where pi = pi_ref and the rewards are 0 up to rounding, whose sign another
    program (the packed forward) may flip."""
    from kto_jax.train.metrics import TIMING_KEYS, read_jsonl
    import numpy as np
    for log in logs:
        ours, theirs = (read_jsonl(os.path.join(w, log)) for w in (workdir, reference_run))
        assert [r["step"] for r in ours] == [r["step"] for r in theirs] and ours
        for i, (mine, ref) in enumerate(zip(ours, theirs)):
            for key, value in ref.items():
                if key in TIMING_KEYS or value is None or (
                        not first_step_accuracy and i == 0 and log == "metrics.jsonl"
                        and key.endswith("accuracies")):
                    continue
                np.testing.assert_allclose(mine[key], value, rtol=1e-5, atol=2e-5,
                                           err_msg=f"{log} step {ref['step']} {key}")


def metrics(workdir: str, name: str = "metrics.jsonl") -> list[dict]:
    """A run's logged lines without the timing fields (which differ between runs)."""
    from kto_jax.train.metrics import TIMING_KEYS, read_jsonl
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in read_jsonl(os.path.join(workdir, name))]


def tensors(hf_dir: str) -> dict:
    """Every tensor of an HF directory's safetensors files, by name."""
    from safetensors.numpy import load_file
    out = {}
    for path in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        out.update(load_file(path))
    return out


def committed_steps(workdir: str) -> list[int]:
    """Checkpoint steps whose directories Orbax has finished (renamed from their tmp name)."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def wait_for(predicate, proc: subprocess.Popen, stderr_of=lambda: "", timeout: float = 600.0,
             poll: float = 0.01) -> None:
    """Waits until predicate() holds; fails with the process's stderr if it ends first."""
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early: {stderr_of()[-3000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(poll)


def kill_after_checkpoint(argv: list[str], env: dict, workdir: str, min_step: int = 1,
                          committed=committed_steps, poll: float = 0.01) -> None:
    """Starts `argv` (a `kto-jax train`) and SIGKILLs it as soon as `committed(workdir)` holds
    a checkpoint of step >= min_step: the crash the resume tests recover from. Its stderr
    goes to a file (a pipe nobody reads could fill up and stall the run)."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)

        def stderr_of() -> str:
            log.seek(0)
            return log.read()
        try:
            wait_for(lambda: any(s >= min_step for s in committed(workdir)), proc, stderr_of,
                     poll=poll)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
