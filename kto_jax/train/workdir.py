"""The layout of a `kto-jax train` workdir: every file and directory name, in one place.

  WORKDIR/
    config.json          the resolved run config (also saved with each checkpoint)
    model/               the policy's HF config.json and tokenizer, all `kto-jax export` needs
    checkpoints/         Orbax checkpoints (kto_jax/train/checkpoint.py)
    metrics.jsonl        one line per logged train step (kto_jax/train/metrics.py)
    eval_metrics.jsonl   one line per evaluation of the held-out split
    tb/                  TensorBoard events
    hf/                  the policy exported at the end of the run (kto_jax/train/export.py)
    hf.step              the step hf/ holds
    hf-latest/           the latest checkpoint, exported on demand by `kto-jax sample` / `eval`
    rounds/NNNN/         `kto-jax online`: round NNNN's prompts, samples + verdicts + labels,
                         training examples and held-out samples, as JSONL (kto_jax/online/rounds.py)
    online.png           `kto-jax online`: pass rate, KL and reward margin per round

WORKDIR may be a local path or an object-store URL (kto_jax/fs.py).
"""

from __future__ import annotations

from kto_jax import fs as paths

CONFIG_FILE = "config.json"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
EVAL_METRICS_FILE = "eval_metrics.jsonl"
TB_DIR = "tb"
HF_DIR = "hf"
EXPORT_MARKER = "hf.step"
HF_LATEST_DIR = "hf-latest"
LOCK_FILE = "run.lock"  # host, PID and start time of the run using the workdir
ROUNDS_DIR = "rounds"
ROUND_PROMPTS = "prompts.jsonl"
ROUND_SAMPLES = "samples.jsonl"
ROUND_EXAMPLES = "examples.jsonl"
ROUND_HELDOUT = "heldout.jsonl"
ROUND_HELDOUT_EXAMPLES = "heldout_examples.jsonl"
ROUND_HELDOUT_UNPAIRED = "heldout_unpaired.jsonl"
ROUND_PARTIAL_VERDICTS = "verdicts.partial.jsonl"
ONLINE_PLOT = "online.png"


def path(workdir: str, name: str, *more: str) -> str:
    """WORKDIR/name[/more...], for a local path or a URL; `name` is one of the names above."""
    return paths.join(workdir, name, *more)
