"""Test-wide setup: 8 virtual CPU devices so sharding tests run without accelerators, and
the fixtures several test folders share."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An HF directory of a tiny random chat model (tests/tiny_chat_model.py), one per module."""
    pytest.importorskip("torch")
    from tiny_chat_model import write_tiny_chat_model
    return write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")))
