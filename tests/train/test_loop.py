"""The metrics window: sums on device, exact through a checkpoint round trip, readable summary."""

import json

import jax.numpy as jnp
import pytest

from kto_jax.train.loop import MetricsWindow


def _step_metrics(i: int) -> dict:
    return {"loss_sum": jnp.float32(0.1 * i + 1 / 3), "loss_denominator": jnp.float32(4.0),
            "num_examples": jnp.float32(4.0), "count/desirable": jnp.float32(3.0),
            "count/undesirable": jnp.float32(1.0), "rewards/desirable_sum": jnp.float32(0.3 * i),
            "rewards/undesirable_sum": jnp.float32(-0.1 * i), "kl_sum": jnp.float32(0.2),
            "tokens": jnp.float32(50.0), "grad_norm": jnp.float32(1.0 + i),
            "lr": jnp.float32(1e-6 * i), "skipped_updates": jnp.int32(i // 2)}


def test_window_summary_by_hand():
    window = MetricsWindow()
    for i in (1, 2):
        window.add(_step_metrics(i))
    out = window.pop_summary()
    assert out["loss"] == pytest.approx((0.1 + 0.2 + 2 / 3) / 8, rel=1e-6)
    assert out["rewards/desirable"] == pytest.approx(0.9 / 6, rel=1e-6)
    assert out["rewards/undesirable"] == pytest.approx(-0.3 / 2, rel=1e-6)
    assert out["rewards/margins"] == pytest.approx(0.9 / 6 + 0.3 / 2, rel=1e-6)
    assert out["grad_norm"] == pytest.approx(2.5)            # mean over the window's steps
    assert out["lr"] == pytest.approx(2e-6) and out["skipped_updates"] == 1  # last step's values
    assert out["logps/desirable"] is None                    # required key the loss did not give
    assert window.to_host() is None                          # popped: a fresh window


def test_window_survives_a_json_round_trip_bit_for_bit():
    uninterrupted, first = MetricsWindow(), MetricsWindow()
    for i in range(3):
        uninterrupted.add(_step_metrics(i))
        first.add(_step_metrics(i))
    resumed = MetricsWindow(json.loads(json.dumps(first.to_host())))
    for i in range(3, 5):
        uninterrupted.add(_step_metrics(i))
        resumed.add(_step_metrics(i))
    assert resumed.to_host() == uninterrupted.to_host()
    assert resumed.pop_summary() == uninterrupted.pop_summary()


def test_z0_warning_names_the_single_row_microbatches_and_the_fix():
    from kto_jax.losses.kto import z0_warning
    assert z0_warning({"count/kl_unpaired_microbatches": 0.0}) is None
    assert z0_warning({"loss": 0.5}) is None
    text = z0_warning({"count/kl_unpaired_microbatches": 2.0})
    assert "2 microbatch(es) had a single real row" in text and "z0 is 0" in text
    assert "data.drop_remainder=True" in text
