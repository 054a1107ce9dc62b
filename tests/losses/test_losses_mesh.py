"""z0 and the KTO loss on an 8-device mesh (data=4, fsdp=2) equal their single-device values."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from kto_jax.losses import kto_loss, reference_point


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    return jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def test_z0_and_loss_on_mesh_equal_single_device(mesh):
    rng = np.random.default_rng(0)
    m = 16
    arrays = {
        "policy_logps": rng.normal(-20, 3, m).astype(np.float32),
        "reference_logps": rng.normal(-20, 3, m).astype(np.float32),
        "policy_kl_logps": rng.normal(-40, 3, m).astype(np.float32),
        "reference_kl_logps": rng.normal(-41, 3, m).astype(np.float32),
        "desirable": rng.random(m) < 0.5,
        "mask": np.arange(m) < 13,  # filler rows at the end, as in a last partial batch
    }
    want_z0 = max(0.0, float(np.mean((arrays["policy_kl_logps"] - arrays["reference_kl_logps"])[:13])))

    def run(x):
        z0 = reference_point(x["policy_kl_logps"], x["reference_kl_logps"], x["mask"])
        loss, metrics = kto_loss(**x, beta=0.1)
        return z0, loss, metrics

    single = jax.jit(run)({k: jax.device_put(v, jax.devices()[0]) for k, v in arrays.items()})
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    sharded_in = {k: jax.device_put(v, sharding) for k, v in arrays.items()}
    assert len(sharded_in["policy_kl_logps"].sharding.device_set) == 8
    with jax.set_mesh(mesh):
        sharded = jax.jit(run)(sharded_in)
    assert float(single[0]) == pytest.approx(want_z0, rel=1e-6) and want_z0 > 0
    np.testing.assert_allclose(float(sharded[0]), float(single[0]), rtol=1e-6)
    np.testing.assert_allclose(float(sharded[1]), float(single[1]), rtol=1e-6)
    for key in single[2]:
        np.testing.assert_allclose(float(sharded[2][key]), float(single[2][key]), rtol=1e-5, err_msg=key)
