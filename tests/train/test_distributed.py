"""Coordinator resolution and SIGTERM handling (the 2-process run is in test_multiprocess.py)."""

import os
import signal

import pytest

from kto_jax.errors import UserError
from kto_jax.train import distributed


def test_resolve_coordinator_from_env(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert distributed.resolve_coordinator() is None
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    assert distributed.resolve_coordinator() == ("10.0.0.1:1234", 4, 3)
    assert distributed.resolve_coordinator(process_id=0) == ("10.0.0.1:1234", 4, 0)


def test_resolve_coordinator_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "host:1")
    monkeypatch.delenv(distributed.ENV_NUM_PROCESSES, raising=False)
    monkeypatch.delenv(distributed.ENV_PROCESS_ID, raising=False)
    with pytest.raises(UserError, match="KTO_JAX_NUM_PROCESSES, KTO_JAX_PROCESS_ID"):
        distributed.resolve_coordinator()
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(UserError, match="KTO_JAX_NUM_PROCESSES='two'"):
        distributed.resolve_coordinator()
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "2")
    with pytest.raises(UserError, match=r"must lie in \[0, "):
        distributed.resolve_coordinator()


def test_initialize_is_a_no_op_on_a_single_cpu_host(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "has_tpu_chips", lambda: False)
    assert distributed.initialize() is False


def test_sigterm_sets_the_flag_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with distributed.PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.should_stop()
    assert signal.getsignal(signal.SIGTERM) == before
