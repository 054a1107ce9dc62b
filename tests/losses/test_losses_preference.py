"""DPO/cDPO, IPO, SimPO, ORPO and SLiC against numpy hand computations of their papers' formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.losses import dpo_loss, ipo_loss, orpo_loss, simpo_loss, slic_loss, summarize_metrics

PW = np.array([-10.0, -22.0, -7.5, -15.0, -30.0], np.float32)   # log pi(y_w|x)
PL = np.array([-12.0, -20.0, -9.0, -15.5, -28.0], np.float32)   # log pi(y_l|x)
RW = np.array([-11.0, -21.0, -8.0, -14.0, -31.0], np.float32)   # log ref(y_w|x)
RL = np.array([-11.5, -21.5, -8.5, -16.0, -27.0], np.float32)   # log ref(y_l|x)
NW = np.array([5.0, 11.0, 3.0, 6.0, 12.0], np.float32)          # |y_w|
NL = np.array([6.0, 9.0, 4.0, 7.0, 10.0], np.float32)           # |y_l|


def logsig(x):
    return -np.log1p(np.exp(-x))


def j(*xs):
    return [jnp.asarray(x) for x in xs]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_matches_cdpo_formula(label_smoothing):
    """DPO (eps = 0) and conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"):

      h = beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]
      cost = -(1 - eps) log sigma(h) - eps log sigma(-h)
      rewards = beta (log pi - log ref) per side; rewards/accuracies = mean(chosen > rejected).
    """
    beta = 0.1
    logits = (PW.astype(np.float64) - PL) - (RW.astype(np.float64) - RL)
    losses = -logsig(beta * logits) * (1 - label_smoothing) - logsig(-beta * logits) * label_smoothing
    cr, rr = beta * (PW.astype(np.float64) - RW), beta * (PL.astype(np.float64) - RL)
    loss, metrics = dpo_loss(*j(PW, PL, RW, RL), beta=beta, label_smoothing=label_smoothing)
    s = summarize_metrics(metrics)
    np.testing.assert_allclose(float(loss), losses.mean(), rtol=1e-6)
    np.testing.assert_allclose(s["rewards/desirable"], cr.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s["rewards/undesirable"], rr.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s["rewards/margins"], (cr - rr).mean(), rtol=1e-5, atol=1e-6)
    assert s["rewards/accuracies"] == pytest.approx(np.mean(cr > rr))
    np.testing.assert_allclose(s["logps/desirable"], PW.mean(), rtol=1e-6)
    assert s["num_examples"] == 5


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_label_smoothing_against_trl_1_16_sigmoid_and_robust(label_smoothing):
    """What TRL 1.16's DPOTrainer does with the same label_smoothing (its own code, trl_harness).

    loss_type="sigmoid" ignores label_smoothing: it is plain DPO, -log sigma(h), i.e. our
    `dpo` with eps = 0 whatever eps is set. loss_type="robust" is rDPO (Chowdhury et al. 2024):
    (-(1 - eps) log sigma(h) + eps log sigma(-h)) / (1 - 2 eps), which equals cDPO only at eps = 0.
    """
    trl_harness = pytest.importorskip("trl_harness")
    beta, eps = 0.1, label_smoothing
    plain_dpo, _ = dpo_loss(*j(PW, PL, RW, RL), beta=beta, label_smoothing=0.0)
    cdpo, _ = dpo_loss(*j(PW, PL, RW, RL), beta=beta, label_smoothing=eps)
    sigmoid, _ = trl_harness.trl_dpo("sigmoid", PW, PL, RW, RL, beta=beta, label_smoothing=eps)
    robust, _ = trl_harness.trl_dpo("robust", PW, PL, RW, RL, beta=beta, label_smoothing=eps)
    np.testing.assert_allclose(sigmoid, float(plain_dpo), rtol=1e-5)
    h = beta * ((PW.astype(np.float64) - PL) - (RW.astype(np.float64) - RL))
    rdpo = np.mean((-(1 - eps) * logsig(h) + eps * logsig(-h)) / (1 - 2 * eps))
    np.testing.assert_allclose(robust, rdpo, rtol=1e-6)
    if eps == 0.0:
        np.testing.assert_allclose(float(cdpo), robust, rtol=1e-5)
    else:
        assert abs(float(cdpo) - robust) > 1e-3 and abs(float(cdpo) - sigmoid) > 1e-3


def test_dpo_hand_value_and_gradient():
    # one pair, h = beta * ((-1) - (-2)) = 0.5 (beta = 0.5): loss = log(1 + e^-0.5)
    loss, _ = dpo_loss(*j([-1.0], [-2.0], [0.0], [0.0]), beta=0.5)
    assert float(loss) == pytest.approx(np.log1p(np.exp(-0.5)), rel=1e-6)
    g = jax.grad(lambda w: dpo_loss(w, *j([-2.0], [0.0], [0.0]), beta=0.5)[0])(jnp.asarray([-1.0]))
    # d/dw -log sigma(beta (w - l)) = -beta (1 - sigma(h))
    assert float(g[0]) == pytest.approx(-0.5 * (1 - 1 / (1 + np.exp(-0.5))), rel=1e-5)


def test_dpo_mask():
    mask = np.array([True, False, True, True, False])
    bad = PW.copy()
    bad[~mask] = np.nan
    loss, m = dpo_loss(*j(bad, PL, RW, RL), beta=0.1, mask=jnp.asarray(mask))
    full, _ = dpo_loss(*j(PW[mask], PL[mask], RW[mask], RL[mask]), beta=0.1)
    np.testing.assert_allclose(float(loss), float(full), rtol=1e-6)
    assert float(m["num_examples"]) == 3
    assert all(np.isfinite(v) for v in summarize_metrics(m).values())


def test_ipo_length_normalised():
    tau = 0.1
    rho_w = (PW.astype(np.float64) - RW) / NW
    rho_l = (PL.astype(np.float64) - RL) / NL
    want = np.mean((rho_w - rho_l - 1 / (2 * tau)) ** 2)
    loss, m = ipo_loss(*j(PW, PL, RW, RL, NW, NL), tau=tau)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(summarize_metrics(m)["rewards/desirable"], rho_w.mean(), rtol=1e-5, atol=1e-6)


def test_simpo():
    beta, gamma = 2.0, 0.5
    h = beta * PW.astype(np.float64) / NW - beta * PL.astype(np.float64) / NL - gamma
    loss, m = simpo_loss(*j(PW, PL, NW, NL), beta=beta, gamma=gamma)
    np.testing.assert_allclose(float(loss), np.mean(-logsig(h)), rtol=1e-6)
    assert summarize_metrics(m)["rewards/accuracies"] == pytest.approx(
        np.mean(beta * PW / NW > beta * PL / NL))


def test_orpo_matches_paper_and_trl_log_odds():
    """ORPO (Hong et al. 2024): L_SFT - lam log sigma(log odds ratio) with length-averaged log-probs.

    Log odds as in trl/experimental/orpo/orpo_trainer.py (commit f2cd5771, odds_ratio_loss):
      log_odds = (chosen_logps - rejected_logps) - (log1p(-exp(chosen_logps)) - log1p(-exp(rejected_logps)))
    """
    lam = 0.1
    aw, al = PW.astype(np.float64) / NW, PL.astype(np.float64) / NL
    log_odds = (aw - al) - (np.log1p(-np.exp(aw)) - np.log1p(-np.exp(al)))
    want = np.mean(-aw - lam * logsig(log_odds))
    loss, m = orpo_loss(*j(PW, PL, NW, NL), lam=lam)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(summarize_metrics(m)["orpo/log_odds"], log_odds.mean(), rtol=1e-5, atol=1e-6)


def test_orpo_is_finite_near_probability_one():
    loss, _ = orpo_loss(*j([-1e-9, -1e-3], [-5.0, -1e-6], [4.0, 1.0], [4.0, 2.0]))
    g = jax.grad(lambda w: orpo_loss(w, *j([-5.0, -1e-6], [4.0, 1.0], [4.0, 2.0]))[0])(jnp.asarray([-1e-9, -1e-3]))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g)))


def test_slic():
    delta, lam = 1.0, 0.1
    hinge = np.maximum(0.0, delta - PW.astype(np.float64) + PL)
    want = np.mean(hinge + lam * -PW.astype(np.float64))
    loss, _ = slic_loss(*j(PW, PL), delta=delta, lambda_reg=lam)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    # pair 4 (index 3): log pi(y_w) - log pi(y_l) = 0.5 < delta -> hinge active: 0.5 + 0.1 * 15
    one, _ = slic_loss(*j(PW[3:4], PL[3:4]), delta=delta, lambda_reg=lam)
    assert float(one) == pytest.approx(0.5 + 1.5, rel=1e-6)
