"""Workdir file helpers on local paths and on the URL code path (exercised on a local dir)."""

import os

import pytest

from kto_jax import fs as paths


@pytest.fixture(params=["local", "url"])
def base(request, tmp_path, monkeypatch):
    """A run directory; "url" forces the object-store branch (etils.epath, no append)."""
    if request.param == "url":
        monkeypatch.setattr(paths, "is_remote", lambda _: True)
    return str(tmp_path / "run")


def test_text_files_and_appends(base):
    paths.makedirs(base)
    f = paths.join(base, "metrics.jsonl")
    assert not paths.exists(f)
    paths.append_text(f, "a\n")
    paths.append_text(f, "b\n")
    assert paths.read_text(f) == "a\nb\n"
    paths.write_text(f, "c\n")
    assert paths.read_text(f) == "c\n"


def test_staged_dir_uploads_and_local_copy_downloads(base):
    target = paths.join(base, "hf")
    with paths.staged_dir(target) as local:
        with open(os.path.join(local, "config.json"), "w", encoding="utf-8") as f:
            f.write("{}")
    assert paths.read_text(paths.join(target, "config.json")) == "{}"
    with paths.local_copy(target) as local:
        assert os.listdir(local) == ["config.json"]


def test_urls_are_kept_and_joined_with_slashes():
    assert paths.resolve("gs://bucket/run/") == "gs://bucket/run"
    assert paths.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
    assert paths.resolve("rel") == os.path.abspath("rel")
