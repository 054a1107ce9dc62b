"""Entry points as Flax / transformers users call them: dtypes as jnp types, ids-only calls."""

import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kto_jax.errors import UserError
from kto_jax.models import save_pretrained
from kto_jax.models.config import dtype_name, tiny
from kto_jax.models.transformer import Transformer


@pytest.mark.parametrize("value", ["bfloat16", jnp.bfloat16, jnp.dtype("bfloat16")])
def test_dtype_arguments_accept_jnp_types(value):
    config = tiny(param_dtype=value, dtype=value)
    assert config.param_dtype == config.dtype == "bfloat16"
    assert config == tiny(param_dtype="bfloat16", dtype="bfloat16")  # same jit static (hash and equality)
    assert hash(config) == hash(tiny(param_dtype="bfloat16", dtype="bfloat16"))
    model = Transformer(config, rngs=nnx.Rngs(0))
    assert model.embed_tokens[...].dtype == jnp.bfloat16


def test_dtype_name_forms_and_errors():
    assert dtype_name(np.float32) == "float32" and dtype_name(jnp.float16) == "float16"
    with pytest.raises(UserError, match=r"model param_dtype <class 'jax.numpy.int8'> is not one of float32"):
        tiny(param_dtype=jnp.int8)
    with pytest.raises(UserError, match="model dtype 'bf16' is not one of"):
        tiny(dtype="bf16")


def _safetensors_dtypes(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_save_pretrained_takes_a_jnp_dtype(tmp_path):
    model = Transformer(tiny(), rngs=nnx.Rngs(0))
    save_pretrained(model, str(tmp_path), dtype=jnp.bfloat16)
    files = list(tmp_path.glob("*.safetensors"))
    assert files and all(_safetensors_dtypes(f) == {"BF16"} for f in files)


def test_model_called_with_token_ids_alone():
    """model(ids) == model(ids, positions 0..T-1, a full mask) == model(ids, positions, None)."""
    model = Transformer(tiny(), rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 256, (2, 7)), jnp.int32)
    positions = jnp.tile(jnp.arange(7, dtype=jnp.int32), (2, 1))
    alone = model(ids)
    np.testing.assert_allclose(alone, model(ids, positions, jnp.ones_like(ids)), atol=1e-5)
    np.testing.assert_allclose(alone, model(ids, positions, None), atol=0)
    np.testing.assert_allclose(model.hidden_states(ids), model.hidden_states(ids, positions), atol=0)
