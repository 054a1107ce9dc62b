"""Quiet by default (kto_jax/console.py): other packages' start-up noise stays off the console
of a CPU host, `--verbose` lets it through, and real errors still reach it."""

import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest

from kto_jax import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The noise the user saw, one marker per source.
LIBTPU_NOISE = ("Failed to find host bounds", "unexpected worker hostname")
TORCH_NOTE = "PyTorch was not found"
# Runs the CLI with torch hidden from transformers, as on a fresh `pip install kto-jax`.
WITHOUT_TORCH = """
import importlib.util, runpy, sys
real_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: (
    None if name.split(".")[0] == "torch" else real_find_spec(name, *a, **k))
sys.argv = ["kto-jax", *sys.argv[1:]]
runpy.run_module("kto_jax.cli", run_name="__main__")
"""

needs_libtpu_on_a_cpu_host = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None or console.has_tpu_chips(),
    reason="libtpu's host discovery only speaks on a host with libtpu and no TPU chip")


def _user_env(**extra) -> dict:
    """The environment of a user's shell: no JAX_PLATFORMS (so JAX probes libtpu), one device."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "XLA_FLAGS", console.VERBOSE_ENV,
                        "TRANSFORMERS_NO_ADVISORY_WARNINGS", *console.LIBTPU_TOPOLOGY_ENV)}
    env.update(PYTHONPATH=REPO, **extra)
    return env


def _sample(tiny_dir, tmp_path, *cli_flags):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the cat"}) + "\n")
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *cli_flags, "sample", f"--model={tiny_dir}",
         f"--prompts={prompts}", "--max_new_tokens=2", f"--out={tmp_path / 'out.jsonl'}"],
        capture_output=True, text=True, cwd=tmp_path, env=_user_env(), timeout=300)


@pytest.mark.slow
@pytest.mark.xdist_group("libtpu")  # probes libtpu: never beside a TPU compile (pytest.ini)
@needs_libtpu_on_a_cpu_host
def test_a_cli_run_on_a_cpu_host_prints_no_libtpu_or_torch_noise(tiny_dir, tmp_path):
    quiet = _sample(tiny_dir, tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    for marker in (*LIBTPU_NOISE, TORCH_NOTE, "E0000", "Traceback"):
        assert marker not in quiet.stderr, quiet.stderr
    assert "sampled 1 completions" in quiet.stderr   # the command's own lines still show

    loud = _sample(tiny_dir, tmp_path, "--verbose")   # the same run, everything shown
    assert loud.returncode == 0, loud.stderr
    for marker in (*LIBTPU_NOISE, TORCH_NOTE):
        assert marker in loud.stderr, loud.stderr


def test_libtpu_is_left_alone_where_it_has_work(monkeypatch):
    monkeypatch.setattr(console.importlib.util, "find_spec", lambda name: object())
    for name in (*console.LIBTPU_TOPOLOGY_ENV, "JAX_PLATFORMS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(console, "has_tpu_chips", lambda: False)
    assert console.libtpu_quiet_env() == console.LIBTPU_ONE_HOST
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")        # JAX never starts libtpu's backend
    assert console.libtpu_quiet_env() == {}
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert console.libtpu_quiet_env() == console.LIBTPU_ONE_HOST
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-32")  # the user describes the slice
    assert console.libtpu_quiet_env() == {}
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE")
    monkeypatch.setattr(console, "has_tpu_chips", lambda: True)  # a TPU VM: libtpu's real start
    assert console.libtpu_quiet_env() == {}


def test_verbose_flag_and_variable(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert not console.is_verbose()
    for value, verbose in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv(console.VERBOSE_ENV, value)
        assert console.is_verbose() is verbose
    monkeypatch.delenv(console.VERBOSE_ENV)
    from kto_jax import cli
    assert cli.main(["--verbose", "--help"]) == 0
    assert console.is_verbose()


def test_orbax_read_only_note_only_when_verbose(tmp_path, caplog, monkeypatch):
    from kto_jax.train.checkpoint import Checkpointer
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    caplog.set_level(logging.INFO)
    Checkpointer(str(tmp_path), read_only=True).close()
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "Given directory is read only" not in said and "setting save_interval_steps" not in said
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    caplog.clear()
    Checkpointer(str(tmp_path), read_only=True).close()
    assert any("Given directory is read only" in r.getMessage() for r in caplog.records)


def test_orbax_errors_still_reach_the_log(caplog):
    from kto_jax.train.checkpoint_faults import quiet_orbax_errors
    quiet_orbax_errors()
    caplog.set_level(logging.WARNING)
    logging.getLogger("absl").warning("a real warning from %s", "anywhere")
    assert "a real warning from anywhere" in caplog.text
