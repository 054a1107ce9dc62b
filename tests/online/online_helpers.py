"""Running `kto-jax online` on configs/online_tiny_cpu.py in subprocesses."""

import os
import sys

from run_helpers import REPO, cli_env

HERE = os.path.dirname(os.path.abspath(__file__))
ONLINE_CONFIG = os.path.join(REPO, "configs", "online_tiny_cpu.py")


def online_env(cache_dir: str, devices: int = 2, **extra: str) -> dict:
    """cli_env with this folder on the path, so `online_judge:score` imports."""
    return cli_env(cache_dir, devices=devices, PYTHONPATH=f"{REPO}{os.pathsep}{HERE}", **extra)


def online_argv(workdir: str, model_dir: str, prompts: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kto_jax.cli", "online", f"--config={ONLINE_CONFIG}",
            f"--workdir={workdir}", f"--config.model.path={model_dir}",
            f"--config.online.prompts_path={prompts}",
            "--config.online.judge=online_judge:score", *extra]
