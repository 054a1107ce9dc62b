"""Orbax checkpoints: exact round trip onto target shardings, iterator position, retention."""

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kto_jax.errors import UserError
from kto_jax.train.checkpoint import Checkpointer, abstract_like, numpy_state


def _mesh():
    return jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _state(mesh, seed=0):
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "data"))
    rng = np.random.default_rng(seed)
    params = {"w": jax.device_put(jnp.asarray(rng.normal(size=(4, 8)), jnp.float32), sharding),
              "b": jnp.asarray(rng.normal(size=(3,)), jnp.bfloat16)}
    opt_state = optax.adamw(1e-3).init(params)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(seed),
            "rng": jax.random.key(seed)}


def _iterator():
    return iter(grain.MapDataset.range(20).shuffle(seed=1).batch(2).to_iter_dataset())


def _assert_equal(a, b):
    a, b = numpy_state(a), numpy_state(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_round_trip_restores_state_shardings_iterator_and_config(tmp_path):
    mesh = _mesh()
    state = _state(mesh, seed=3)
    it = _iterator()
    next(it), next(it)
    ckpt = Checkpointer(str(tmp_path), every_steps=1, keep=2)
    assert ckpt.save(3, state, it, json.dumps({"optim": {"lr": 1e-6}}), meta={"window": {"a": 0.1}})
    expected_next = [next(it) for _ in range(3)]
    ckpt.close()

    ckpt = Checkpointer(str(tmp_path), every_steps=1, keep=2)
    fresh = _state(mesh, seed=0)
    abstract = jax.tree.map(lambda x: x, abstract_like(fresh))
    it2 = _iterator()
    restored, step = ckpt.restore(abstract, it2)
    assert step == 3
    _assert_equal(restored, state)
    assert restored["params"]["w"].sharding == state["params"]["w"].sharding
    assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    for want in expected_next:
        np.testing.assert_array_equal(next(it2), want)
    assert ckpt.restore_config() == {"optim": {"lr": 1e-6}}
    assert ckpt.restore_meta(3) == {"window": {"a": 0.1}}
    params, step = ckpt.restore_subtree("params", abstract["params"])
    _assert_equal(params, state["params"])
    ckpt.close()


def test_every_n_steps_keep_last_k_and_force(tmp_path):
    mesh = _mesh()
    state, it = _state(mesh), _iterator()
    ckpt = Checkpointer(str(tmp_path), every_steps=2, keep=2, async_save=True)
    saved = [step for step in range(1, 8) if ckpt.save(step, state, it, "{}")]
    assert saved == [2, 4, 6]
    assert ckpt.save(7, state, it, "{}", force=True)
    assert not ckpt.save(7, state, it, "{}", force=True)  # already on disk
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
    ckpt.close()
    reader = Checkpointer(str(tmp_path), read_only=True)
    assert reader.all_steps() == [6, 7] and reader.restore_meta() == {}
    reader.close()


def test_missing_step_is_a_user_error(tmp_path):
    ckpt = Checkpointer(str(tmp_path), every_steps=1, keep=1)
    assert ckpt.latest_step() is None
    with pytest.raises(UserError, match="no checkpoint for step 5"):
        ckpt.restore_config(5)
    ckpt.close()
