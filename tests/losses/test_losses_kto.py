"""KTO (eq. 8) and its variants against numpy hand computations and TRL's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.losses import (apo_zero_unpaired_loss, kto_concave_loss, kto_loss, kto_no_z0_loss,
                            kto_reference_free_loss, kto_risk_neutral_loss, reference_point,
                            summarize_metrics)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


POLICY = np.array([-10.0, -12.5, -8.0, -20.0, -15.0, -9.0], np.float32)
REFERENCE = np.array([-11.0, -12.0, -9.5, -18.0, -15.5, -7.0], np.float32)
POLICY_KL = np.array([-30.0, -25.0, -28.0, -22.0, -26.0, -31.0], np.float32)
REFERENCE_KL = np.array([-31.0, -26.5, -28.0, -24.0, -25.0, -32.0], np.float32)
DESIRABLE = np.array([True, False, True, False, True, True])


def inputs(**over):
    d = dict(policy_logps=POLICY, reference_logps=REFERENCE, policy_kl_logps=POLICY_KL,
             reference_kl_logps=REFERENCE_KL, desirable=DESIRABLE)
    d.update(over)
    return {k: jnp.asarray(v) for k, v in d.items()}


def kto_numpy(beta, lam_d, lam_u, mask=None, weight=None):
    """Eq. 8 by hand in float64."""
    mask = np.ones(6, bool) if mask is None else mask
    weight = np.ones(6) if weight is None else weight
    p, r = POLICY.astype(np.float64), REFERENCE.astype(np.float64)
    kl = (POLICY_KL.astype(np.float64) - REFERENCE_KL)[mask].mean()
    z0 = max(0.0, kl)
    rew = p - r
    cost = np.where(DESIRABLE, lam_d * (1 - sigmoid(beta * (rew - z0))),
                    lam_u * (1 - sigmoid(beta * (z0 - rew)))) * weight
    return cost[mask].sum() / mask.sum(), z0


def test_kto_loss_matches_hand_computation():
    loss, metrics = kto_loss(**inputs(), beta=0.1, desirable_weight=1.5, undesirable_weight=0.7)
    want, z0 = kto_numpy(0.1, 1.5, 0.7)
    assert z0 == pytest.approx(0.75)  # mean of the KL log-ratios (1, 1.5, 0, 2, -1, 1)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    s = summarize_metrics(metrics)
    assert s["kl"] == pytest.approx(z0, rel=1e-6)
    assert s["num_examples"] == 6 and s["count/desirable"] == 4 and s["count/undesirable"] == 2
    np.testing.assert_allclose(s["loss"], want, rtol=1e-6)


def test_kto_loss_matches_trl_formula():
    """TRL's KTO loss encoded in numpy.

    Source: huggingface/trl, trl/trainer/kto_trainer.py (commit f2cd5771, KTOTrainer._compute_loss):
      kl = (KL_logps - ref_KL_logps).mean().clamp(min=0)
      chosen_losses = 1 - sigmoid(beta * (chosen_logratios - kl))
      rejected_losses = 1 - sigmoid(beta * (kl - rejected_logratios))
      losses = cat(desirable_weight * chosen_losses, undesirable_weight * rejected_losses)
      loss = losses.nanmean(); rewards = beta * logratios; metrics are means per class,
      rewards/margins = rewards/chosen - rewards/rejected.
    """
    beta, dw, uw = 0.5, 1.33, 1.0
    kl = max(0.0, float(np.mean(POLICY_KL.astype(np.float64) - REFERENCE_KL)))
    logratios = POLICY.astype(np.float64) - REFERENCE
    chosen, rejected = logratios[DESIRABLE], logratios[~DESIRABLE]
    losses = np.concatenate([dw * (1 - sigmoid(beta * (chosen - kl))),
                             uw * (1 - sigmoid(beta * (kl - rejected)))])
    trl = {
        "loss": np.nanmean(losses), "kl": kl,
        "rewards/desirable": (beta * chosen).mean(), "rewards/undesirable": (beta * rejected).mean(),
        "logps/desirable": POLICY[DESIRABLE].mean(), "logps/undesirable": POLICY[~DESIRABLE].mean(),
    }
    trl["rewards/margins"] = trl["rewards/desirable"] - trl["rewards/undesirable"]
    loss, metrics = kto_loss(**inputs(), beta=beta, desirable_weight=dw, undesirable_weight=uw)
    s = summarize_metrics(metrics)
    np.testing.assert_allclose(float(loss), trl["loss"], rtol=1e-6)
    for key, value in trl.items():
        np.testing.assert_allclose(s[key], value, rtol=1e-5, err_msg=key)


def test_gradient_is_eq10_and_no_gradient_through_z0():
    beta, lam_d, lam_u = 0.3, 2.0, 0.5
    x = inputs()

    def f(p, pkl, rkl):
        return kto_loss(p, x["reference_logps"], pkl, rkl, x["desirable"], beta=beta,
                        desirable_weight=lam_d, undesirable_weight=lam_u)[0]

    g_p, g_pkl, g_rkl = jax.grad(f, argnums=(0, 1, 2))(x["policy_logps"], x["policy_kl_logps"],
                                                      x["reference_kl_logps"])
    _, z0 = kto_numpy(beta, lam_d, lam_u)
    z = POLICY.astype(np.float64) - REFERENCE - z0
    d = np.where(DESIRABLE, -1.0, 1.0)
    lam = np.where(DESIRABLE, lam_d, lam_u)
    eq10 = d * lam * sigmoid(beta * z) * (1 - sigmoid(beta * z)) * beta / len(z)
    np.testing.assert_allclose(np.asarray(g_p), eq10, rtol=1e-5, atol=1e-9)
    assert np.all(np.asarray(g_pkl) == 0.0) and np.all(np.asarray(g_rkl) == 0.0)


def test_prop41_gradient_vanishes_for_extreme_rewards():
    p = jnp.asarray([1e4, -1e4], jnp.float32)
    g = jax.grad(lambda p: kto_loss(p, jnp.zeros(2), jnp.zeros(2), jnp.zeros(2),
                                    jnp.array([True, False]))[0])(p)
    assert np.all(np.abs(np.asarray(g)) < 1e-12)


def test_z0_clamped_at_zero():
    x = inputs(policy_kl_logps=REFERENCE_KL - 3.0, reference_kl_logps=REFERENCE_KL)
    assert float(reference_point(x["policy_kl_logps"], x["reference_kl_logps"])) == 0.0
    loss, m = kto_loss(**x)
    loss0, _ = kto_no_z0_loss(x["policy_logps"], x["reference_logps"], x["desirable"])
    assert float(loss) == pytest.approx(float(loss0), rel=1e-7)
    assert float(m["kl_sum"]) == 0.0
    z0 = reference_point(jnp.asarray(POLICY_KL), jnp.asarray(REFERENCE_KL))
    np.testing.assert_allclose(float(z0), np.mean(POLICY_KL - REFERENCE_KL), rtol=1e-6)


def test_mask_drops_examples_and_kl_pairs_even_when_they_hold_nan():
    mask = np.array([True, True, False, True, True, False])
    bad = POLICY.copy()
    bad[~mask] = np.nan
    bad_kl = POLICY_KL.copy()
    bad_kl[~mask] = np.inf
    x = inputs(policy_logps=bad, policy_kl_logps=bad_kl)
    loss, metrics = kto_loss(**x, beta=0.2, mask=jnp.asarray(mask))
    want, z0 = kto_numpy(0.2, 1.0, 1.0, mask=mask)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    s = summarize_metrics(metrics)
    assert s["num_examples"] == 4 and s["count/desirable"] == 2
    assert s["kl"] == pytest.approx(z0, rel=1e-6)
    g = jax.grad(lambda p: kto_loss(p, x["reference_logps"], x["policy_kl_logps"],
                                    x["reference_kl_logps"], x["desirable"], mask=jnp.asarray(mask))[0])(
        x["policy_logps"])
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[~mask] == 0.0)


def test_separate_kl_mask():
    kl_mask = np.array([True, True, True, True, False, False])
    loss, m = kto_loss(**inputs(), kl_mask=jnp.asarray(kl_mask))
    z0 = max(0.0, float(np.mean((POLICY_KL - REFERENCE_KL)[kl_mask])))
    assert summarize_metrics(m)["kl"] == pytest.approx(z0, rel=1e-6)
    assert summarize_metrics(m)["num_examples"] == 6


def test_all_desirable_batch_gives_finite_metrics_and_no_undesirable_means():
    """z0 edge: one class only -> that class's means and the margin are absent, not 0."""
    x = inputs(desirable=np.ones(6, bool))
    loss, metrics = jax.jit(kto_loss)(**x)
    s = summarize_metrics(metrics)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(v) for v in s.values())
    assert s["count/undesirable"] == 0
    for key in ("rewards/undesirable", "logps/undesirable", "rewards/margins"):
        assert key not in s, key
    assert s["rewards/desirable"] == pytest.approx(0.1 * float(np.mean(POLICY - REFERENCE)), rel=1e-5)


def test_empty_batch_gives_zero_loss_and_finite_metrics():
    loss, metrics = kto_loss(**inputs(), mask=jnp.zeros(6, bool))
    assert float(loss) == 0.0
    s = summarize_metrics(metrics)
    assert all(np.isfinite(v) for v in s.values())
    assert s["num_examples"] == 0 and "loss" not in s and "kl" not in s   # nothing to average


def test_per_example_weight_scales_costs():
    w = np.array([1.0, 2.0, 0.5, 1.0, 0.0, 3.0], np.float32)
    loss, _ = kto_loss(**inputs(), weight=jnp.asarray(w))
    want, _ = kto_numpy(0.1, 1.0, 1.0, weight=w)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)


def test_dynamic_desirable_weight():
    """Section 4.2: lambda_D + delta on desirable examples with r - z0 < 0, cost continuous at 0."""
    beta, delta = 0.4, 1.5
    x = inputs()
    loss, _ = kto_loss(**x, beta=beta, dynamic_desirable_weight=delta)
    _, z0 = kto_numpy(beta, 1.0, 1.0)
    u = np.where(DESIRABLE, beta * (POLICY - REFERENCE - z0), beta * (z0 - POLICY + REFERENCE))
    cost = 1 - sigmoid(u) + np.where(DESIRABLE & (u < 0), delta * (0.5 - sigmoid(u)), 0.0)
    np.testing.assert_allclose(float(loss), cost.mean(), rtol=1e-6)
    g = jax.grad(lambda p: kto_loss(p, x["reference_logps"], x["policy_kl_logps"],
                                    x["reference_kl_logps"], x["desirable"], beta=beta,
                                    dynamic_desirable_weight=delta)[0])(x["policy_logps"])
    lam = np.where(DESIRABLE & (u < 0), 1.0 + delta, 1.0)
    sig = sigmoid(u)
    want = np.where(DESIRABLE, -1.0, 1.0) * lam * sig * (1 - sig) * beta / 6
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-9)
    assert (DESIRABLE & (u < 0)).any() and (DESIRABLE & (u > 0)).any()
    # continuity of the cost at r - z0 = 0
    zero = jnp.zeros(1)
    eps = 1e-4
    lo = kto_loss(-jnp.full(1, eps), zero, zero, zero, jnp.array([True]), dynamic_desirable_weight=delta)[0]
    hi = kto_loss(jnp.full(1, eps), zero, zero, zero, jnp.array([True]), dynamic_desirable_weight=delta)[0]
    assert abs(float(lo) - float(hi)) < 1e-4


def test_concave_and_risk_neutral_variants():
    beta = 0.2
    _, z0 = kto_numpy(beta, 1.0, 1.0)
    u = np.where(DESIRABLE, beta * (POLICY - REFERENCE - z0), beta * (z0 - POLICY + REFERENCE))
    lam = np.where(DESIRABLE, 1.2, 0.8)
    kw = dict(beta=beta, desirable_weight=1.2, undesirable_weight=0.8)
    concave, _ = kto_concave_loss(**inputs(), **kw)
    np.testing.assert_allclose(float(concave), np.mean(lam * np.log1p(np.exp(-u))), rtol=1e-6)
    neutral, _ = kto_risk_neutral_loss(**inputs(), **kw)
    np.testing.assert_allclose(float(neutral), np.mean(-lam * u), rtol=1e-5)


def test_apo_zero_unpaired_matches_trl_and_equals_no_z0():
    """TRL kto_trainer.py (commit f2cd5771), loss_type == "apo_zero_unpaired":
    chosen_losses = 1 - sigmoid(beta * chosen_logratios); rejected_losses = sigmoid(beta * rejected_logratios)."""
    beta, dw, uw = 0.3, 1.0, 2.0
    lr = POLICY.astype(np.float64) - REFERENCE
    trl = np.concatenate([dw * (1 - sigmoid(beta * lr[DESIRABLE])), uw * sigmoid(beta * lr[~DESIRABLE])]).mean()
    x = inputs()
    apo, m = apo_zero_unpaired_loss(x["policy_logps"], x["reference_logps"], x["desirable"], beta=beta,
                                    desirable_weight=dw, undesirable_weight=uw)
    no_z0, _ = kto_no_z0_loss(x["policy_logps"], x["reference_logps"], x["desirable"], beta=beta,
                              desirable_weight=dw, undesirable_weight=uw)
    np.testing.assert_allclose(float(apo), trl, rtol=1e-6)
    np.testing.assert_allclose(float(no_z0), trl, rtol=1e-6)
    assert float(m["kl_sum"]) == 0.0


def test_reference_free_variant():
    """Uniform pi_ref: r - z0 = log pi(y|x) - mean log pi(y_j|x_i) (the constant log|Y| cancels)."""
    beta = 0.05
    x = inputs()
    loss, m = kto_reference_free_loss(x["policy_logps"], x["policy_kl_logps"], x["desirable"],
                                      beta=beta, desirable_weight=1.75)
    z = POLICY.astype(np.float64) - POLICY_KL.mean()
    cost = np.where(DESIRABLE, 1.75 * (1 - sigmoid(beta * z)), 1 - sigmoid(-beta * z))
    np.testing.assert_allclose(float(loss), cost.mean(), rtol=1e-6)
    # same as KTO with a constant reference log-prob -c large enough that the clamp never binds
    c = 1e3
    ref = kto_loss(x["policy_logps"], jnp.full(6, -c), x["policy_kl_logps"], jnp.full(6, -c),
                   x["desirable"], beta=beta, desirable_weight=1.75)[0]
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-4)
    assert summarize_metrics(m)["rewards/desirable"] == pytest.approx(beta * POLICY[DESIRABLE].mean(), rel=1e-6)
