"""Test-wide setup: 8 virtual CPU devices so sharding tests run without accelerators, one
JAX compilation cache for the whole run, and the fixtures several test folders share.

The compilation cache: this process and every `kto-jax` subprocess a test starts (they
inherit the environment; tests/train/run_helpers.py `cli_env` passes the same directory)
read and write one persistent cache, so a program compiled once in a run (the tiny train
step, the sampler, the export) is loaded, not compiled again, by every later process. A
JAX_COMPILATION_CACHE_DIR already set is used and kept; otherwise the run makes a
temporary one and removes it at the end. Under pytest-xdist (`-n 2`) the controller
process reads this file first and its workers inherit the variable: one cache for all.
"""

import os
import shutil
import sys
import tempfile

import pytest

# --xla_backend_optimization_level=0: the tests' programs are tiny, run a few steps each and
# are compiled by the hundred, so XLA's CPU compiler dominates the suite; without LLVM's
# optimisation passes the tiny train step compiles in 4.0 CPU-s instead of 7.3 (the same HLO;
# results within the tests' tolerances).
# --xla_cpu_collective_call_terminate_timeout_seconds: XLA:CPU aborts the process (SIGABRT,
# "F rendezvous.cc:161 Termination timeout ... of 40 seconds exceeded") when one virtual
# device reaches a collective 40 s after the others. With 8 virtual devices on 2 busy cores a
# device thread can be that late: this was the suite's occasional abort (reproduced with one
# device given ~25 s more work before a psum and the timeout at 3 s). 30 minutes is longer
# than any test.
# CLI subprocesses inherit the flags (tests/cli_runs.py).
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds=1800"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0 "
                                   + COLLECTIVE_TIMEOUT_FLAG)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_OWN_CACHE = not os.environ.get("JAX_COMPILATION_CACHE_DIR")
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kto-jax-tests-jax-cache-")
COMPILE_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
# every program is cached, however fast it compiled or small it is: the tiny test programs
# compile in well under JAX's default threshold of 1 s, yet there are hundreds of them
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
if "jax" in sys.modules:  # imported before this file (a plugin): the variables came too late
    import jax
    jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(COMPILE_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def compile_cache() -> str:
    """The run's persistent compilation cache directory (pass it to CLI subprocesses)."""
    return COMPILE_CACHE


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """An HF directory of the tiny random Llama with the "llama" tokenizer (tests/tiny_models.py):
    the model the trainer and online tests train."""
    pytest.importorskip("torch")
    from tiny_models import write_model_dir
    return write_model_dir(str(tmp_path_factory.mktemp("tiny_llama")), "llama")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """An HF directory of the tiny random chat model (ChatML, eos <|im_end|>; tests/tiny_models.py)
    for sampling, eval and demo tests. Shared by the whole run: tests do not modify it."""
    pytest.importorskip("torch")
    from tiny_models import write_model_dir
    return write_model_dir(str(tmp_path_factory.mktemp("tiny_chat")), "chat")
