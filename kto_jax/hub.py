"""Hugging Face hub ids where a model path is expected: `HuggingFaceTB/SmolLM2-135M-Instruct`.

`local_model_path(path)` (and `resolve_id`, which leaves any non-id path to the caller's
own checks) returns `path` unchanged when it names a local file or directory
(or a gs:// URL), and otherwise reads it as a hub repo id: the snapshot in the local
Hugging Face cache (HF_HUB_CACHE, HF_HOME) when it is there, else one downloaded with
`huggingface_hub.snapshot_download` (only what kto-jax reads: config.json, the safetensors
weights and their index, the tokenizer files). HF_HUB_OFFLINE=1 keeps it to the cache.
A missing, unreachable or gated model is one UserError naming the id and the fix.

The run's config keeps the id as given, so a resume on another machine resolves it from
its own cache, and a PEFT export names the hub id as its base.
"""

from __future__ import annotations

import os
import re

from kto_jax import fs
from kto_jax.errors import UserError

# What kto-jax reads from a model repo; never the *.bin, *.pth or original/ weights.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
               "chat_template.json", "adapter_config.json", "adapter_model.safetensors")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def looks_like_hub_id(path: str) -> bool:
    """'org/name' that is not a local path, a URL or a .gguf file."""
    path = str(path)
    return (bool(_REPO_ID.fullmatch(path)) and not path.endswith(".gguf")
            and not fs.is_remote(path) and not os.path.exists(path))


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now rather than at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def local_model_path(path: str, *, what: str = "model path") -> str:
    """`path` itself, or the local snapshot directory of the hub repo `path`.

    Args:
      path: a local file or directory, a URL, or a hub repo id ("org/name").
      what: how the user gave it, for messages (e.g. "config.model.path").

    Raises:
      UserError: a path that does not exist and is no hub id; a hub id that is neither
        cached nor downloadable (offline, unknown, gated, unreachable).
    """
    path = str(path)
    if fs.is_remote(path) or os.path.exists(path):
        return path
    if not looks_like_hub_id(path):
        raise UserError(f"{what}={path!r} does not exist: give a local directory, a .gguf file "
                        "or a Hugging Face hub id such as HuggingFaceTB/SmolLM2-135M-Instruct.")
    cached = _cached_snapshot(path)
    if cached is not None:
        return cached
    if offline():
        raise UserError(f"{what}={path!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1: "
                        f"run `huggingface-cli download {path}` where the hub is reachable, or pass "
                        "a local directory.")
    return _download(path, what)


def resolve_id(path: str, *, what: str = "model path") -> str:
    """The local snapshot of `path` when it is a hub id, else `path` unchanged (the loaders'
    own checks then name a missing file)."""
    return local_model_path(path, what=what) if looks_like_hub_id(path) else str(path)


def _cached_snapshot(repo_id: str) -> str | None:
    """The cached snapshot directory of `repo_id` holding its config.json, or None."""
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
    from huggingface_hub.errors import LocalEntryNotFoundError  # pylint: disable=import-outside-toplevel
    try:
        local = snapshot_download(repo_id, local_files_only=True, cache_dir=_cache_dir())
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    has_files = any(os.path.isfile(os.path.join(local, name))
                    for name in ("config.json", "adapter_config.json"))
    return local if has_files else None


def _download(repo_id: str, what: str) -> str:
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
    from huggingface_hub import errors  # pylint: disable=import-outside-toplevel
    page = f"https://huggingface.co/{repo_id}"
    try:
        return snapshot_download(repo_id, allow_patterns=list(MODEL_FILES), cache_dir=_cache_dir())
    except errors.GatedRepoError:
        raise UserError(f"{what}={repo_id!r} is a gated model: accept its license at {page}, then "
                        "log in with `huggingface-cli login` (or set HF_TOKEN).") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{what}={repo_id!r}: no such model on the Hugging Face hub, or a private "
                        "one (log in with `huggingface-cli login`), and no such local path.") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, errors.HfHubHTTPError,
            OSError) as e:
        raise UserError(f"{what}={repo_id!r} is not in the Hugging Face cache and the hub cannot be "
                        f"reached ({type(e).__name__}): connect, or run `huggingface-cli download "
                        f"{repo_id}` elsewhere and copy the cache, or pass a local directory.") from None


def _cache_dir() -> str | None:
    """HF_HUB_CACHE / HF_HOME as set now (huggingface_hub reads them once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None
