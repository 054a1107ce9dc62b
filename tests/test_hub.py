"""Hub ids where a model path is expected (kto_jax/hub.py), offline, from a hub cache directory:
the snapshot is found, the loaders and `kto-jax sample` take the id, and a missing, offline
or unknown id is one line naming it and the fix."""

import json

import pytest

from hub_cache import place_in_hub_cache
from kto_jax import cli
from kto_jax import hub
from kto_jax.errors import UserError

REPO_ID = "kto-jax-test/tiny-chat"


@pytest.fixture()
def cache(tiny_dir, tmp_path, monkeypatch):
    """HF_HUB_CACHE holding the tiny chat model as REPO_ID; offline (tests/conftest.py)."""
    cache_dir = tmp_path / "hub"
    snapshot = place_in_hub_cache(tiny_dir, str(cache_dir), REPO_ID)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return snapshot


def test_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "runs" / "kto").mkdir(parents=True)
    assert not hub.looks_like_hub_id("runs/kto")          # an existing directory is a path
    assert hub.local_model_path("runs/kto") == "runs/kto"
    for not_an_id in ("model.gguf", "org/model.gguf", "gs://bucket/model", "/abs/path", "a/b/c", "single"):
        assert not hub.looks_like_hub_id(not_an_id), not_an_id
        assert hub.resolve_id(not_an_id) == not_an_id     # left to the loader's own checks


def test_a_cached_id_is_its_snapshot_offline(cache):
    assert hub.local_model_path(REPO_ID) == cache
    from kto_jax.models import from_pretrained, load_tokenizer
    from kto_jax.models.hf_io import read_hf_config
    assert read_hf_config(REPO_ID)["num_hidden_layers"] == 2
    assert load_tokenizer(REPO_ID).eos_token == "<|im_end|>"
    _, config = from_pretrained(REPO_ID)
    assert config.num_layers == 2


@pytest.mark.parametrize("path, needles", [
    ("kto-jax-test/not-cached", ("'kto-jax-test/not-cached'", "HF_HUB_OFFLINE=1",
                                 "huggingface-cli download kto-jax-test/not-cached")),
    ("nowhere", ("'nowhere' does not exist", "hub id")),
])
def test_a_missing_model_is_one_line_naming_it_and_the_fix(cache, path, needles):
    with pytest.raises(UserError) as err:
        hub.local_model_path(path, what="config.model.path")
    message = str(err.value)
    assert "\n" not in message and message.startswith("config.model.path=")
    for needle in needles:
        assert needle in message, message


def test_unreachable_hub_says_so(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")     # nothing listens there
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError, match="hub cannot be reached.*huggingface-cli download kto-jax-test/other"):
        hub.local_model_path("kto-jax-test/other", what="--model")


def test_sample_takes_a_hub_id(cache, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the cat"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli.main(["sample", f"--model={REPO_ID}", f"--prompts={prompts}", "--max_new_tokens=3",
                     f"--out={out}"]) == 0
    assert json.loads(out.read_text())["num_tokens"] >= 1
    assert cli.main(["sample", "--model=kto-jax-test/absent", f"--prompts={prompts}"]) == 2
    assert "huggingface-cli download kto-jax-test/absent" in capsys.readouterr().err


@pytest.mark.parametrize("error_name, needle", [
    ("GatedRepoError", "is a gated model: accept its license at https://huggingface.co/meta-llama/x"),
    ("RepositoryNotFoundError", "no such model on the Hugging Face hub"),
])
def test_gated_and_unknown_models_say_what_to_do(cache, monkeypatch, error_name, needle):
    import huggingface_hub
    from huggingface_hub import errors
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    error_type = getattr(errors, error_name)

    def refuse(repo_id, local_files_only=False, **kwargs):
        if local_files_only:
            raise errors.LocalEntryNotFoundError("not cached")
        error = error_type.__new__(error_type)     # the hub's answer, without an HTTP response
        Exception.__init__(error, "refused")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(UserError, match=needle):
        hub.local_model_path("meta-llama/x", what="config.model.path")
