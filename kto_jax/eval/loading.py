"""Which weights a `--model` argument names: an HF directory, a .gguf file, or a run's workdir.

A workdir of `kto-jax train` holds WORKDIR/hf (the export written at the end of a
run) and WORKDIR/checkpoints; when the export is missing (a run still going, or
export_at_end=False) the latest checkpoint is exported to WORKDIR/hf-latest first.
A workdir's frozen reference is its config's model.path (WORKDIR/config.json).
"""

from __future__ import annotations

import json
import os
from typing import Any

from jax.sharding import Mesh

from kto_jax import hub
from kto_jax.errors import UserError
from kto_jax.train import workdir as layout


def resolve_model_path(path: str) -> str:
    """An HF directory or .gguf file for `path` (exporting a workdir's checkpoint if needed);
    a hub id ("org/name") is its snapshot in the local Hugging Face cache (kto_jax/hub.py)."""
    if hub.looks_like_hub_id(path):
        return hub.local_model_path(path, what="--model")
    if str(path).endswith(".gguf"):
        if not os.path.isfile(path):
            raise UserError(f"model file {path!r} does not exist")
        return str(path)
    if os.path.isfile(os.path.join(path, "config.json")) and not is_workdir(path):
        return path
    if is_workdir(path):
        from kto_jax.train.export import export_checkpoint
        exported = os.path.join(path, layout.HF_DIR)
        if os.path.isfile(os.path.join(exported, "config.json")):
            return exported
        if os.path.isdir(os.path.join(path, layout.CHECKPOINT_DIR)):
            out = os.path.join(path, layout.HF_LATEST_DIR)
            step = export_checkpoint(path, out)
            print(f"exported checkpoint step {step} of {path} to {out}")
            return out
    raise UserError(f"--model {path!r} is neither a Hugging Face directory (config.json + "
                    "safetensors) or hub id, a .gguf file, nor a `kto-jax train` workdir")


def is_workdir(path: str) -> bool:
    """True for a `kto-jax train` run directory (it holds the run's config.json and model/)."""
    return (os.path.isdir(os.path.join(path, layout.MODEL_DIR))
            and os.path.isfile(os.path.join(path, layout.CONFIG_FILE)))


def workdir_config(path: str) -> dict:
    """The resolved config a run saved in WORKDIR/config.json, as a dict."""
    with open(os.path.join(path, layout.CONFIG_FILE), encoding="utf-8") as f:
        return json.load(f)


def load_model(path: str, *, mesh: Mesh | None = None, rules: Any = None,
               dtype: str = "float32") -> tuple[Any, Any, str]:
    """(model, tokenizer, resolved path) for an HF dir, a .gguf file or a workdir."""
    from kto_jax.models import from_pretrained, load_tokenizer
    resolved = resolve_model_path(path)
    model, _ = from_pretrained(resolved, mesh=mesh, rules=rules, param_dtype=dtype, dtype=dtype)
    return model, load_tokenizer(resolved), resolved
