"""BCO and humanline: hand golden values, TRL's BCO formula over microbatches, z0 edges."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from kto_jax.errors import UserError
from kto_jax.losses import (bco_loss, get_loss, humanline_loss, kto_loss, running_mean_update,
                            summarize_metrics)
from kto_jax.losses.bco import update_bco_state

LN3 = math.log(3.0)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def j(*xs):
    return [jnp.asarray(np.asarray(x, np.float32)) for x in xs]


# ---------------------------------------------------------------- BCO

def test_bco_hand_values_with_and_without_history():
    """beta = 1, rewards ln 3 (desirable) and -ln 3 (undesirable)."""
    policy, reference, desirable = j([-5.0 + LN3, -5.0 - LN3], [-5.0, -5.0], [True, False])
    # fresh state: delta = this microbatch's mean reward = 0; both rows cost -log sigma(ln 3) = ln(4/3)
    loss, m = bco_loss(policy, reference, desirable, running_mean=jnp.float32(0.0),
                       running_count=jnp.int32(0), beta=1.0)
    assert float(loss) == pytest.approx(math.log(4.0 / 3.0), rel=1e-6)
    s = summarize_metrics(m)
    assert s["bco/delta"] == pytest.approx(0.0, abs=1e-7) and s["rewards/accuracies"] == 1.0
    assert s["rewards/desirable"] == pytest.approx(LN3, rel=1e-6)
    # history mu = 1 over n = 2 rewards; this batch (sum 0, 2 rows): delta = 1 + (0 - 1) 2/4 = 0.5
    loss, m = bco_loss(policy, reference, desirable, running_mean=jnp.float32(1.0),
                       running_count=jnp.int32(2), beta=1.0)
    want = (-log_sigmoid(LN3 - 0.5) - log_sigmoid(LN3 + 0.5)) / 2
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert summarize_metrics(m)["bco/delta"] == pytest.approx(0.5, rel=1e-6)
    # evaluation (frozen): delta = mu = 1, not moved by this batch
    loss, m = bco_loss(policy, reference, desirable, running_mean=jnp.float32(1.0),
                       running_count=jnp.int32(2), beta=1.0, frozen=True)
    want = (-log_sigmoid(LN3 - 1.0) - log_sigmoid(LN3 + 1.0)) / 2
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert summarize_metrics(m)["bco/delta"] == pytest.approx(1.0)


def test_running_mean_update_rule():
    mean, count = running_mean_update(jnp.float32(1.0), jnp.int32(2), jnp.float32(7.0), jnp.float32(3.0))
    assert float(mean) == pytest.approx((1.0 * 2 + 7.0) / 5) and int(count) == 5
    mean, count = running_mean_update(mean, count, jnp.float32(0.0), jnp.float32(0.0))  # empty: unchanged
    assert float(mean) == pytest.approx(9.0 / 5) and int(count) == 5 and count.dtype == jnp.int32


def test_bco_gradient_by_hand_and_no_gradient_through_delta():
    """d cost / d log pi = -beta (1 - sigma(r - delta)) (desirable), +beta sigma(r - delta)
    (undesirable), divided by the row count; delta is a constant."""
    beta = 0.5
    policy, reference, desirable = j([-3.0, -4.0], [-4.0, -4.5], [True, False])
    g = jax.grad(lambda p: bco_loss(p, reference, desirable, running_mean=jnp.float32(0.2),
                                    running_count=jnp.int32(6), beta=beta)[0])(policy)
    rewards = [beta * 1.0, beta * 0.5]
    delta = 0.2 + (sum(rewards) / 2 - 0.2) * 2 / 8
    want = [-beta * (1 - sigmoid(rewards[0] - delta)) / 2, beta * sigmoid(rewards[1] - delta) / 2]
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5)


def test_bco_matches_trls_formula_over_microbatches():
    """Three training microbatches (one with filler rows, one with one class only) through
    the registry loss with the state carried by `update_loss_state`, against TRL's
    BCOTrainer.bco_loss + RunningMoments (tests/trl_harness.py, restated: TRL 1.16 has no BCO)."""
    trl_harness = pytest.importorskip("trl_harness")
    rng = np.random.default_rng(3)
    layouts = [([1, 0, 1, 1, 0, 0], [1] * 6), ([0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0]),
               ([1, 1, 1, 1, 1, 1], [1] * 6)]
    loss_fn, hp = get_loss("bco"), get_config().loss
    hp.beta = 0.3
    state = {k: jnp.asarray(v) for k, v in loss_fn.initial_loss_state().items()}
    ours_losses, ours_deltas, trl_mbs = [], [], []
    for desirable, valid in layouts:
        desirable, valid = np.asarray(desirable, bool), np.asarray(valid, bool)
        policy = rng.normal(-20.0, 3.0, 6).astype(np.float32)
        reference = rng.normal(-20.0, 3.0, 6).astype(np.float32)
        policy[~valid] = np.nan  # filler rows must not reach the loss or the running mean
        stats = {"policy_logps": jnp.asarray(policy), "reference_logps": jnp.asarray(reference),
                 "desirable": jnp.asarray(desirable), "weight": jnp.asarray(valid, jnp.float32),
                 "valid": jnp.asarray(valid), **state}
        loss, metrics = loss_fn(stats, hp)
        ours_losses.append(float(loss))
        ours_deltas.append(summarize_metrics(metrics)["bco/delta"])
        state = loss_fn.update_loss_state(state, metrics)
        trl_mbs.append({"policy_logps": policy[valid], "reference_logps": reference[valid],
                        "desirable": desirable[valid]})
    trl_losses, trl_deltas = trl_harness.trl_bco(trl_mbs, beta=0.3)
    np.testing.assert_allclose(ours_losses, trl_losses, rtol=1e-5)
    np.testing.assert_allclose(ours_deltas, trl_deltas, rtol=1e-5, atol=1e-6)
    # the state after the last microbatch is the mean of all 16 real rewards
    all_rewards = np.concatenate([0.3 * (mb["policy_logps"] - mb["reference_logps"]) for mb in trl_mbs])
    assert int(state["bco_count"]) == 16
    assert float(state["bco_delta"]) == pytest.approx(float(all_rewards.mean()), rel=1e-5)


def test_update_bco_state_reads_the_losss_metrics():
    _, m = bco_loss(*j([-1.0, -2.0, -3.0], [-1.5, -2.0, -2.0], [True, True, False]),
                    running_mean=jnp.float32(0.0), running_count=jnp.int32(0), beta=1.0,
                    mask=jnp.asarray([True, True, False]))
    new = update_bco_state({"bco_delta": jnp.float32(0.0), "bco_count": jnp.int32(0)}, m)
    assert float(new["bco_delta"]) == pytest.approx(0.25) and int(new["bco_count"]) == 2


# ---------------------------------------------------------------- humanline

def _humanline_inputs():
    """2 rows x 3 completion tokens; the log-ratios are policy - reference (reference = 0)."""
    ratios = np.array([[2.0, 0.5, -3.0], [0.2, -0.4, 0.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    kl_ratios = np.array([[0.3, 3.0, 0.0], [-2.0, 0.0, 0.0]], np.float32)
    kl_mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    return dict(policy_token_logps=jnp.asarray(ratios - 5.0), reference_token_logps=jnp.full((2, 3), -5.0),
                completion_mask=jnp.asarray(mask), policy_kl_token_logps=jnp.asarray(kl_ratios - 4.0),
                reference_kl_token_logps=jnp.full((2, 3), -4.0), kl_completion_mask=jnp.asarray(kl_mask),
                desirable=jnp.asarray([True, False]))


def test_humanline_hand_values():
    """Clamp to [-1, 1.5] per token: r = (1.5 + 0.5 - 1.0, 0.2 - 0.4) = (1.0, -0.2); KL pairs
    (0.3 + 1.5, -1.0) -> z0 = max(0, 0.4) = 0.4; beta = 0.5: both rows cost 1 - sigma(0.3)."""
    x = _humanline_inputs()
    loss, m = humanline_loss(**x, beta=0.5, log_eps_p=-1.0, log_eps_r=1.5)
    assert float(loss) == pytest.approx(1.0 - sigmoid(0.3), rel=1e-6)
    s = summarize_metrics(m)
    assert s["kl"] == pytest.approx(0.4, rel=1e-6) and s["kl/unclamped"] == pytest.approx(0.4, rel=1e-6)
    assert s["rewards/desirable"] == pytest.approx(0.5, rel=1e-6)        # beta * clamped r
    assert s["rewards/undesirable"] == pytest.approx(-0.1, rel=1e-5)
    assert s["logps/desirable"] == pytest.approx(-15.0 - 0.5, rel=1e-6)  # unclamped policy log-prob
    assert s["humanline/unclamped"] == pytest.approx(3.0 / 5.0)         # 0.5, 0.2, -0.4 of 5 tokens
    # tokens outside the interval get no gradient; inside ones get the KTO slope
    g = jax.grad(lambda p: humanline_loss(**dict(x, policy_token_logps=p), beta=0.5)[0])(
        x["policy_token_logps"])
    g = np.asarray(g)
    assert g[0, 0] == 0.0 and g[0, 2] == 0.0 and g[1, 2] == 0.0
    slope = 0.5 * sigmoid(0.3) * (1 - sigmoid(0.3)) / 2
    np.testing.assert_allclose([g[0, 1], g[1, 0], g[1, 1]], [-slope, slope, slope], rtol=1e-5)


def test_humanline_with_wide_bounds_is_kto_on_summed_log_probs():
    x = _humanline_inputs()
    loss, _ = humanline_loss(**x, beta=0.3, log_eps_p=-1e6, log_eps_r=1e6, desirable_weight=1.3)
    tm, km = x["completion_mask"], x["kl_completion_mask"]
    want, _ = kto_loss(jnp.sum(x["policy_token_logps"] * tm, -1), jnp.sum(x["reference_token_logps"] * tm, -1),
                       jnp.sum(x["policy_kl_token_logps"] * km, -1), jnp.sum(x["reference_kl_token_logps"] * km, -1),
                       x["desirable"], beta=0.3, desirable_weight=1.3)
    assert float(loss) == pytest.approx(float(want), rel=1e-6)


def test_humanline_bounds_must_contain_zero():
    hp = get_config().loss
    hp.humanline_log_eps_p = 0.5
    x = _humanline_inputs()
    stats = dict(x, weight=jnp.ones(2), valid=jnp.ones(2, bool))
    with pytest.raises(UserError, match="humanline_log_eps_p=0.5.*contain 0"):
        get_loss("humanline")(stats, hp)


# ---------------------------------------------------------------- z0 edges in the losses

def test_kl_unclamped_is_the_kl_estimate_before_the_clamp():
    p, r, pkl, rkl = j([-5.0, -6.0], [-5.0, -6.0], [-10.0, -12.0], [-9.0, -11.4])
    _, m = kto_loss(p, r, pkl, rkl, jnp.asarray([True, False]))
    s = summarize_metrics(m)
    assert s["kl"] == 0.0                                   # clamped at 0
    assert s["kl/unclamped"] == pytest.approx(-0.8, rel=1e-6)


def test_bco_and_humanline_are_in_the_registry_with_their_needs():
    bco, humanline = get_loss("bco"), get_loss("humanline")
    assert not bco.paired and bco.uses_reference and not bco.uses_kl and not bco.uses_lambda_weights
    assert bco.initial_loss_state() == {"bco_delta": 0.0, "bco_count": 0}
    assert humanline.uses_kl and humanline.uses_token_logps and humanline.uses_lambda_weights
    assert humanline.reference_sync == (1, 1.0)
    hash(bco), hash(humanline)  # StepSettings stays hashable


def test_a_microbatch_with_one_real_row_is_counted_not_silent():
    """z0 edge: one real row has no KL pair, so z0 = 0; the loss counts the microbatch in
    count/kl_unpaired_microbatches (the trainer warns once on it), 0 otherwise."""
    p, r, pkl, rkl = j([-5.0, -6.0, -7.0], [-5.5, -6.0, -7.0], [-10.0, -12.0, -9.0], [-12.0, -11.4, -9.0])
    desirable = jnp.asarray([True, False, True])
    one = jnp.asarray([True, False, False])
    _, m = kto_loss(p, r, pkl, rkl, desirable, mask=one, kl_mask=one & jnp.roll(one, -1))
    s = summarize_metrics(m)
    assert s["count/kl_unpaired_microbatches"] == 1.0 and s["kl"] == 0.0
    _, m = kto_loss(p, r, pkl, rkl, desirable)
    assert summarize_metrics(m)["count/kl_unpaired_microbatches"] == 0.0
    from kto_jax.losses import kto_reference_free_loss
    _, m = kto_reference_free_loss(p, pkl, desirable, mask=one, kl_mask=jnp.zeros(3, bool))
    assert summarize_metrics(m)["count/kl_unpaired_microbatches"] == 1.0
