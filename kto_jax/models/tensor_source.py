"""Where checkpoint tensors come from: the `TensorSource` protocol and its safetensors reader.

A TensorSource hands out tensors one at a time, by Hugging Face name and in HF
layout (torch Linear weights are [out_features, in_features]; q/k rows in HF's
rotate-half order), as host numpy arrays. The HF loader (`hf_io.from_pretrained`)
reads every checkpoint through this protocol, so any format that can present its
tensors this way (safetensors here, GGUF in `kto_jax.models.gguf`) loads through
the same name table, shape checks and sharded placement.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, runtime_checkable

import numpy as np
from safetensors import safe_open

from kto_jax.errors import UserError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


@runtime_checkable
class TensorSource(Protocol):
    """Read access to a checkpoint's tensors by HF name, in HF layout."""

    def names(self) -> set[str]:
        """Every tensor name the checkpoint holds (e.g. 'model.layers.0.self_attn.q_proj.weight')."""
        ...

    def get(self, name: str) -> np.ndarray:
        """One tensor as a host numpy array, in its stored dtype and HF shape."""
        ...


class SafetensorsSource:
    """TensorSource over `model.safetensors` or a sharded `model.safetensors.index.json` in one directory.

    Tensors are read lazily, one at a time (memory-mapped by safetensors).
    """

    def __init__(self, directory: str):
        self.directory = directory
        self._file_of = _tensor_files(directory)
        self._handles: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self._file_of)

    def get(self, name: str) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor without reading its data."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def _handle(self, name: str):
        if name not in self._file_of:
            raise UserError(f"tensor {name!r} is not in the checkpoint at {self.directory}")
        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.directory, file), framework="numpy")
        return self._handles[file]


def _tensor_files(directory: str) -> dict[str, str]:
    """{tensor name: file name} from the index, or from the single safetensors file."""
    index_path = os.path.join(directory, SAFETENSORS_INDEX)
    single = os.path.join(directory, SAFETENSORS_FILE)
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index_path} has no 'weight_map'; it is not a safetensors index")
        missing = sorted({v for v in weight_map.values() if not os.path.exists(os.path.join(directory, v))})
        if missing:
            raise UserError(f"{index_path} lists files that do not exist: {', '.join(missing[:5])}")
        return dict(weight_map)
    if os.path.exists(single):
        with safe_open(single, framework="numpy") as f:
            return {k: SAFETENSORS_FILE for k in f.keys()}
    raise UserError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {directory}; "
                    "kto-jax reads Hugging Face safetensors checkpoints (or a .gguf file)")
