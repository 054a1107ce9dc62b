"""Where checkpoint tensors come from: the `TensorSource` protocol and its safetensors reader.

A TensorSource hands out tensors one at a time, by Hugging Face name and in HF
layout (torch Linear weights are [out_features, in_features]; q/k rows in HF's
rotate-half order), as host numpy arrays. The HF loader (`hf_io.from_pretrained`)
reads every checkpoint through this protocol, so any format that can present its
tensors this way (safetensors here, GGUF in `kto_jax.models.gguf`) loads through
the same name table, shape checks and sharded placement. A checkpoint directory in
a bucket (gs://...) is read the same way, each tensor by one ranged read.

A source that can also read part of a tensor (`SlicingSource`: `shape(name)` and
`get_slice(name, index)`, as safetensors' `safe_open(...).get_slice(name)[index]`) lets each
process read only the rectangles its devices hold (kto_jax/models/shard_read.py);
`read_slices` reads through either kind.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from safetensors import safe_open

from kto_jax import fs
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


@runtime_checkable
class SlicingSource(TensorSource, Protocol):
    """A TensorSource that also reads part of a tensor, and tells a tensor's shape unread."""

    def shape(self, name: str) -> tuple[int, ...]:
        """HF shape of one tensor, without reading its data."""
        ...

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`get(name)[index]` (contiguous slices), reading only (about) those bytes."""
        ...


def read_slices(source: TensorSource, name: str, indices: Sequence[tuple[slice, ...]]) -> list[np.ndarray]:
    """`source.get(name)[index]` for each index: read slice by slice from a SlicingSource,
    else (one whole read) from the tensor."""
    if sliceable(source):
        return [source.get_slice(name, index) for index in indices]
    whole = np.asarray(source.get(name))
    return [whole[index] for index in indices]


def sliceable(source: TensorSource) -> bool:
    """Whether `source` reads parts of tensors (a RenamedSource: whether the one it wraps does)."""
    return isinstance(source.source if isinstance(source, RenamedSource) else source, SlicingSource)


class SafetensorsSource:
    """TensorSource over `model.safetensors` or a sharded `model.safetensors.index.json` in one directory.

    Tensors are read lazily, one at a time (memory-mapped by safetensors; for a
    gs:// directory, one ranged read per tensor).
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

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Part of one tensor; a local file reads only those bytes (memory-mapped), a bucket
        file one ranged read of the slice's rows (whole rows along the first axis)."""
        return self._handle(name).get_slice(name)[tuple(index)]

    def nbytes(self, name: str) -> int:
        """Size of one tensor in the file, without reading its data."""
        piece = self._handle(name).get_slice(name)
        return math.prod(piece.get_shape()) * _ITEMSIZE[piece.get_dtype()]

    def _handle(self, name: str):
        if name not in self._file_of:
            raise UserError(f"tensor {name!r} is not in the checkpoint at {self.directory}")
        file = self._file_of[name]
        if file not in self._handles:
            path = fs.join(self.directory, file)
            self._handles[file] = (_RangedSafetensors(path) if fs.is_remote(path)
                                   else safe_open(path, framework="numpy"))
        return self._handles[file]


class RenamedSource:
    """A TensorSource that shows another's tensors under other names: each name starting with
    an `old` prefix of `prefixes` ((old, new) pairs) appears with `new` instead (a checkpoint
    in an older spelling, read as the family's rows name it)."""

    def __init__(self, source: TensorSource, prefixes: tuple[tuple[str, str], ...]):
        self.source, self.prefixes = source, prefixes
        self._stored = {rename(n, prefixes): n for n in source.names()}

    def names(self) -> set[str]:
        return set(self._stored)

    def get(self, name: str) -> np.ndarray:
        return self.source.get(self._stored[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self._stored[name])

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.source.get_slice(self._stored[name], index)

    def stored_name(self, name: str) -> str:
        """The name the wrapped source stores `name` under."""
        return self._stored[name]


def rename(name: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    """`name` with the first matching `old` prefix of (old, new) `prefixes` replaced by `new`."""
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old):]
    return name


# safetensors dtype names -> numpy (bfloat16 and float8 from ml_dtypes, which jax ships).
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class _RangedSafetensors:
    """One safetensors file read by ranged reads: the header once, then each tensor's bytes.

    Duck-types the part of `safe_open` that `SafetensorsSource` uses (keys, get_tensor,
    get_slice(name).get_shape()), for files in object stores, which have no mmap.
    """

    def __init__(self, path: str):
        self.path = path
        with fs.open_file(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self._header, self._base = header, 8 + size

    def keys(self) -> list[str]:
        return list(self._header)

    def get_slice(self, name: str) -> "_RangedSafetensors._Slice":
        return self._Slice(self, name)

    class _Slice:
        def __init__(self, file: "_RangedSafetensors", name: str):
            self.file, self.name = file, name
            self.shape, self.dtype = file._header[name]["shape"], file._header[name]["dtype"]

        def get_shape(self) -> list[int]:
            return list(self.shape)

        def get_dtype(self) -> str:
            return self.dtype

        def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
            """The slice, from one ranged read of its rows (the first axis's slice, whole rows)."""
            index = tuple(index) if isinstance(index, tuple) else (index,)
            if not self.shape:
                return self.file.get_tensor(self.name)[index]
            lo, hi, _ = index[0].indices(self.shape[0]) if index else (0, self.shape[0], 1)
            row = math.prod(self.shape[1:]) * _ITEMSIZE[self.dtype]
            rows = self.file.read_bytes(self.name, lo * row, max(hi - lo, 0) * row)
            return rows.reshape(max(hi - lo, 0), *self.shape[1:])[(slice(None), *index[1:])]

    def get_tensor(self, name: str) -> np.ndarray:
        entry = self._header[name]
        start, end = entry["data_offsets"]
        return self.read_bytes(name, 0, end - start).reshape(entry["shape"])

    def read_bytes(self, name: str, offset: int, size: int) -> np.ndarray:
        """`size` bytes of tensor `name` from `offset` (within its data), as a flat array of its dtype."""
        import ml_dtypes  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import  (registers bfloat16)
        entry = self._header[name]
        with fs.open_file(self.path, "rb") as f:
            f.seek(self._base + entry["data_offsets"][0] + offset)
            data = f.read(size)
        return np.frombuffer(data, np.dtype(_DTYPES[entry["dtype"]])).copy()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def _tensor_files(directory: str) -> dict[str, str]:
    """{tensor name: file name} from the index, or from the single safetensors file."""
    index_path = fs.join(directory, SAFETENSORS_INDEX)
    single = fs.join(directory, SAFETENSORS_FILE)
    if fs.exists(index_path):
        weight_map = json.loads(fs.read_text(index_path)).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index_path} has no 'weight_map'; it is not a safetensors index")
        missing = sorted({v for v in weight_map.values() if not fs.exists(fs.join(directory, v))})
        if missing:
            raise UserError(f"{index_path} lists files that do not exist: {', '.join(missing[:5])}")
        return dict(weight_map)
    if fs.exists(single):
        with (_RangedSafetensors(single) if fs.is_remote(single)
              else safe_open(single, framework="numpy")) as f:
            return {k: SAFETENSORS_FILE for k in f.keys()}
    raise UserError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {directory}; "
                    "kto-jax reads Hugging Face safetensors checkpoints (or a .gguf file)")
