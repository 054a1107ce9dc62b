"""`train(config, workdir)`: setup, the step loop, the final checkpoint and HF export.

  setup     kto_jax/train/run.py       data, mesh, model, state (or resume), steps
  loop      kto_jax/train/loop.py      steps, metrics windows, periodic eval, checkpoints
  eval      kto_jax/train/evaluate.py  held-out loss, rewards, margins
  export    kto_jax/train/export.py    WORKDIR/hf, loadable by transformers

Re-running the same command on the same workdir resumes from the latest
checkpoint; a finished run only (re)writes a missing export. SIGTERM (TPU
preemption) makes every process stop after the same step, save a checkpoint,
wait for it and return 0.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from typing import Any, Callable, Iterator, TypeVar

import jax
import ml_collections

from kto_jax.step.adapters import policy_params
from kto_jax import fs as paths
from kto_jax.train import workdir as layout
from kto_jax.train.distributed import PreemptionGuard, agree
from kto_jax.train.export import export_params
from kto_jax.train.loop import MetricsWindow, run_loop, save_checkpoint
from kto_jax.train.run import Run, setup_run
from kto_jax.train.workdir_lock import WorkdirLock

R = TypeVar("R")


def _exported_step(workdir: str) -> int | None:
    marker = layout.path(workdir, layout.EXPORT_MARKER)  # the step WORKDIR/hf holds
    return int(paths.read_text(marker)) if paths.exists(marker) else None


def export_at_end(run: Any, final_step: int, what: str) -> None:
    """WORKDIR/hf: the policy of `run` (a train or online run: .workdir, .config, .graphdef,
    .state, .tokenizer, .logger) at `final_step`, under config.train.export_at_end.

    WORKDIR/hf.step records the step exported, so a re-run of a finished run leaves
    hf/ alone and a run extended to more steps replaces it. Under LoRA the export is
    the base with the adapters merged in (kto_jax/train/export.py).
    """
    up_to_date = agree(_exported_step(run.workdir) == final_step)
    if not run.settings.train.export_at_end or up_to_date:
        return
    out = layout.path(run.workdir, layout.HF_DIR)
    export_params(run.graphdef, policy_params(run.graphdef, run.state), out, run.tokenizer,
                  run.settings.train.export_dtype or None)
    if jax.process_index() == 0:
        paths.write_text(layout.path(run.workdir, layout.EXPORT_MARKER), f"{final_step}\n")
    run.logger.message(f"exported the policy {what} to {out}")


def finish(run: Run) -> None:
    """The last checkpoint, then the HF export to WORKDIR/hf (`export_at_end`)."""
    if not run.is_complete:  # a finished run re-run (or one shortened since) saves nothing new
        save_checkpoint(run, run.num_steps, MetricsWindow(), force=True)
    run.checkpointer.wait()
    final_step = max(run.start_step, run.num_steps)
    export_at_end(run, final_step, f"at step {final_step}")


# What a run writes once it has done any work; a workdir holding none of them holds only
# what setup wrote (config, model source, an empty checkpoint directory, the logs' headers).
PROGRESS = (layout.METRICS_FILE, layout.EVAL_METRICS_FILE, layout.ROUNDS_DIR, layout.HF_DIR)


def holds_progress(workdir: str) -> bool:
    """Whether `workdir` holds a checkpoint, metrics, online rounds or an export."""
    checkpoints = layout.path(workdir, layout.CHECKPOINT_DIR)
    return (any(paths.exists(layout.path(workdir, name)) for name in PROGRESS)
            or (paths.isdir(checkpoints) and bool(paths.listdir(checkpoints))))


@contextlib.contextmanager
def run_session(workdir: str, setup: Callable[[], R]) -> Iterator[tuple[R, PreemptionGuard]]:
    """The frame of a run in `workdir`, shared by `kto-jax train` and `kto-jax online`:
    WORKDIR/run.lock held (a second run on the same workdir is refused while this one
    lives), SIGTERM watched (`PreemptionGuard`), the run built by `setup()` (which must
    have `.mesh` and `.close()`), its mesh set for everything inside; on the way out the
    run is closed (checkpoint saves finished, logs flushed) whatever happened. A run that
    fails before its first step removes the (local) workdir it created."""
    created = (jax.process_index() == 0 and not paths.is_remote(workdir)
               and not paths.exists(workdir))
    lock = WorkdirLock(workdir, log=lambda line: print(line, file=sys.stderr),
                       enabled=jax.process_index() == 0)
    try:
        with lock, PreemptionGuard() as guard:
            run = setup()
            try:
                with jax.set_mesh(run.mesh):
                    yield run, guard
            finally:
                run.close()
    except BaseException:
        if created and paths.exists(workdir) and not holds_progress(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def train(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Trains (or resumes) the run of `config` in `workdir`; returns the exit code (0).

    WORKDIR/run.lock keeps a second run off the same workdir while this one lives.
    """
    with run_session(workdir, lambda: setup_run(config, workdir)) as (run, guard):
        outcome = run_loop(run, guard)
        if outcome == "preempted":
            run.checkpointer.wait()
            run.logger.message(f"SIGTERM: saved step {run.checkpointer.latest_step()} "
                               f"to {run.checkpointer.directory}; re-run the same "
                               "command to resume.")
            return 0
        finish(run)
    return 0
