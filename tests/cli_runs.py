"""`kto-jax` (or any Python entry point of the repository) in a subprocess, for every test folder.

A subprocess gets the run's XLA flags and compilation cache (tests/conftest.py) with its own
CPU device count, imports this checkout (PYTHONPATH), and starts with no JAX state: the
trainer, online and demo runs go through here rather than through `cli.main` in the pytest
process, so no run inherits what hundreds of earlier tests left in that process.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(devices: int) -> str:
    """This run's XLA_FLAGS (tests/conftest.py) with `devices` CPU devices instead of its count."""
    count = "--xla_force_host_platform_device_count"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count + "=")]
    return " ".join([f"{count}={devices}", *kept])


def cli_env(cache_dir: str, devices: int = 4, **extra: str) -> dict:
    """Environment of a CLI subprocess: `devices` CPU devices, a shared compilation cache."""
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices),
               JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONPATH=REPO)
    env.update(extra)
    return env


def kto_jax(*args: str) -> list[str]:
    """The argv of `kto-jax ARGS` as this interpreter runs it."""
    return [sys.executable, "-m", "kto_jax.cli", *args]


def run_cli(argv: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs argv to the end; fails the test with its stderr unless it exits 0."""
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
