"""Run logging: WORKDIR/metrics.jsonl, TensorBoard under WORKDIR/tb, a tqdm progress bar.

Only process 0 logs (every process computes the same, globally reduced metrics).
metrics.jsonl holds one JSON object per logged train step; evaluations go to
WORKDIR/eval_metrics.jsonl, with the same `step` key. Floats are written with
Python's shortest round-trip repr, so two runs' files compare exactly. On a
resume from step s, lines with step > s (written after the checkpoint the run
resumes from) are dropped first, so a killed-and-resumed run leaves the same file
as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Mapping

import tqdm
from tensorboardX import SummaryWriter

from kto_jax.train import metric_names as names_lib
from kto_jax import fs as paths
from kto_jax.train.workdir import EVAL_METRICS_FILE, METRICS_FILE, TB_DIR

# Keys every metrics.jsonl line carries; the trainer may add more.
REQUIRED_KEYS = ("step", "loss", "kl", "rewards/desirable", "rewards/undesirable",
                 "rewards/margins", "logps/desirable", "logps/undesirable", "grad_norm",
                 "lr", "tokens_per_s", "mfu", "skipped_updates")
# Keys that measure wall-clock time: they differ between otherwise identical runs.
TIMING_KEYS = ("tokens_per_s", "mfu", "step_time_s", "nonpad_tokens_per_s")


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a .jsonl file, in order ([] if it does not exist)."""
    if not paths.exists(path):
        return []
    return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def truncate_after(path: str, step: int) -> None:
    """Drops every line whose step is > `step` (also a torn last line from a SIGKILL)."""
    if not paths.exists(path):
        return
    kept = []
    for line in paths.read_text(path).splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(json.dumps(record) + "\n")
    paths.write_text(path, "".join(kept))


def _clean(value: Any) -> Any:
    """numpy / jax scalars -> Python numbers (JSON and TensorBoard take those)."""
    return value.item() if hasattr(value, "item") else value


def _summary_writer(logdir: str) -> SummaryWriter | None:
    """TensorBoard writer; None (with a warning) where the store needs a missing client."""
    try:
        return SummaryWriter(logdir)
    except ImportError as err:  # gs:// without google-cloud-storage
        sys.stderr.write(f"warning: no TensorBoard events in {logdir}: {err}\n")
        return None


class MetricsLogger:
    """Writes metrics to metrics.jsonl, TensorBoard and a progress bar.

    Args:
      workdir: the run directory.
      total_steps: the run's last step, for the bar's ETA.
      start_step: the step the run starts (or resumes) from.
      enabled: False on processes other than 0, which then log nothing.
      metric_names: "kto_jax" or "trl": the names rows are written under
        (kto_jax.train.metric_names).
    """

    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
                 enabled: bool = True, metric_names: str = "kto_jax"):
        names_lib.check_scheme(metric_names)
        self.enabled = enabled
        self._names = metric_names
        self._paths = {name: paths.join(workdir, name) for name in (METRICS_FILE, EVAL_METRICS_FILE)}
        self._tb = None
        self._bar = None
        self._interactive = False
        self._warned: set[str] = set()
        self._last_loss: float | None = None   # the progress bar's: the last finite train loss
        if not enabled:
            return
        paths.makedirs(workdir)
        for path in self._paths.values():
            truncate_after(path, start_step)
        self._tb = _summary_writer(paths.join(workdir, TB_DIR))
        self._interactive = sys.stderr.isatty()
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                              dynamic_ncols=True, mininterval=0.5 if self._interactive else 30.0,
                              file=sys.stderr)

    def log_train(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends one train line, writes TensorBoard scalars, refreshes the bar's postfix."""
        if not self.enabled:
            return
        record = self._write(METRICS_FILE, step, metrics, prefix="train/")
        loss = record.get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            self._last_loss = float(loss)   # a record without a finite loss keeps the last one
        postfix = {"loss": "-" if self._last_loss is None else f"{self._last_loss:.4f}"}
        if "tokens_per_s" in record:
            postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
        self._bar.set_postfix(postfix, refresh=False)

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends one eval line (keys as given) and writes them under eval/ in TensorBoard."""
        if not self.enabled:
            return
        record = self._write(EVAL_METRICS_FILE, step, metrics, prefix="eval/")
        self.message(f"eval @ step {step}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in record.items() if k != "step" and isinstance(v, float)))

    def _write(self, name: str, step: int, metrics: Mapping[str, Any], prefix: str) -> dict:
        record = {"step": int(step)}
        record.update({k: _clean(v) for k, v in names_lib.rename(metrics, self._names).items()
                       if k != "step"})
        paths.append_text(self._paths[name], json.dumps(record) + "\n")
        for key, value in record.items():
            if self._tb is not None and key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(prefix + key, value, global_step=step)
        return record

    def advance(self, steps: int = 1) -> None:
        """Moves the progress bar on by `steps` optimizer steps."""
        if self.enabled:
            self._bar.update(steps)

    def message(self, text: str) -> None:
        """A line on stderr that does not break the progress bar (process 0 only)."""
        if not self.enabled:
            return
        if self._interactive:
            self._bar.write(text, file=sys.stderr)
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def warn(self, text: str) -> None:
        """`warning: text` on stderr, once per run however often it is raised."""
        if text not in self._warned:
            self._warned.add(text)
            self.message(f"warning: {text}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.close()
        self._bar.close()
