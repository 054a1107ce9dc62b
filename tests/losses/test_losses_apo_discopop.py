"""DiscoPOP, APO-zero and APO-down: hand golden values, stability, and TRL 1.16's own code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.losses import apo_down_loss, apo_zero_loss, discopop_loss, get_loss, summarize_metrics

PW = np.array([-10.0, -22.0, -7.5, -15.0, -30.0], np.float32)   # log pi(y_w|x)
PL = np.array([-12.0, -20.0, -9.0, -15.5, -28.0], np.float32)   # log pi(y_l|x)
RW = np.array([-11.0, -21.0, -8.0, -14.0, -31.0], np.float32)   # log ref(y_w|x)
RL = np.array([-11.5, -21.5, -8.5, -16.0, -27.0], np.float32)   # log ref(y_l|x)
LN3 = float(np.log(3.0))


def j(*xs):
    return [jnp.asarray(np.asarray(x, np.float32)) for x in xs]


def test_discopop_hand_values():
    # h = 0: sigma(0) = 1/2, so cost = 1/2 log 2 + 1/2 exp(0)
    loss, _ = discopop_loss(*j([-5.0], [-5.0], [-5.0], [-5.0]), beta=1.0, tau=0.05)
    assert float(loss) == pytest.approx(0.5 * np.log(2.0) + 0.5, rel=1e-6)
    # beta = 1, tau = 1, h = ln 3: sigma(h) = 3/4, -log sigma(h) = ln(4/3), exp(-h) = 1/3
    # cost = (1/4) ln(4/3) + (3/4)(1/3)
    loss, m = discopop_loss(*j([-1.0], [-1.0 - LN3], [0.0], [0.0]), beta=1.0, tau=1.0)
    assert float(loss) == pytest.approx(0.25 * np.log(4.0 / 3.0) + 0.25, rel=1e-6)
    s = summarize_metrics(m)
    assert s["rewards/desirable"] == pytest.approx(-1.0) and s["rewards/undesirable"] == pytest.approx(-1 - LN3)


def test_apo_hand_values():
    # beta = 1, r_w = ln 3, r_l = -ln 3: sigma(r_w) = 3/4, sigma(r_l) = 1/4, sigma(r_w - r_l) = 9/10
    args = j([LN3], [-LN3], [0.0], [0.0])
    zero, _ = apo_zero_loss(*args, beta=1.0)
    down, m = apo_down_loss(*args, beta=1.0)
    assert float(zero) == pytest.approx((1 - 0.75) + 0.25, rel=1e-6)   # eq. 7
    assert float(down) == pytest.approx(0.75 + (1 - 0.9), rel=1e-6)    # eq. 8
    assert summarize_metrics(m)["rewards/accuracies"] == 1.0
    # at the reference (r = 0) both cost 1/2 + 1/2
    for fn in (apo_zero_loss, apo_down_loss):
        assert float(fn(*j([-3.0], [-4.0], [-3.0], [-4.0]), beta=0.1)[0]) == pytest.approx(1.0)


def test_apo_gradients_by_hand():
    """d cost / d log pi(y_w) and d log pi(y_l), with s'(u) = sigma(u)(1 - sigma(u)).

    APO-zero: -beta s'(beta r_w) and +beta s'(beta r_l): raise y_w, lower y_l.
    APO-down: beta s'(beta r_w) - beta s'(beta (r_w - r_l)) and +beta s'(beta (r_w - r_l)).
    """
    beta, rw, rl = 0.5, 1.0, 0.5   # r_w = -10 - (-11), r_l = -12 - (-12.5)
    ds = lambda u: 1 / (1 + np.exp(-u)) * (1 - 1 / (1 + np.exp(-u)))  # noqa: E731
    ref = j([-11.0], [-12.5])
    for fn, want_w, want_l in (
            (apo_zero_loss, -beta * ds(beta * rw), beta * ds(beta * rl)),
            (apo_down_loss, beta * ds(beta * rw) - beta * ds(beta * (rw - rl)), beta * ds(beta * (rw - rl)))):
        gw, gl = jax.grad(lambda w, l: fn(w, l, *ref, beta=beta)[0], argnums=(0, 1))(
            jnp.asarray([-10.0]), jnp.asarray([-12.0]))
        assert float(gw[0]) == pytest.approx(want_w, rel=1e-5)
        assert float(gl[0]) == pytest.approx(want_l, rel=1e-5)


def test_discopop_is_finite_at_extreme_log_ratios():
    """exp(-h) overflows float32 for h < -88; the blended form stays finite and equals -log sigma(h)."""
    pw = jnp.asarray([-5000.0, -10.0], jnp.float32)
    args = j([-10.0, -5000.0], [0.0, 0.0], [0.0, 0.0])
    loss, _ = discopop_loss(pw, *args, beta=0.5, tau=0.05)
    g = jax.grad(lambda w: discopop_loss(w, *args, beta=0.5, tau=0.05)[0])(pw)
    # pair 0: h = 0.5 * (-4990) -> cost = -log sigma(h) = 2495; pair 1: h = 2495 -> cost ~ 0
    assert float(loss) == pytest.approx(2495.0 / 2, rel=1e-6)
    assert np.all(np.isfinite(np.asarray(g)))


def test_mask_drops_filler_pairs():
    mask = np.array([True, False, True, True, False])
    bad = PW.copy()
    bad[~mask] = np.nan
    for fn in (discopop_loss, apo_zero_loss, apo_down_loss):
        loss, m = fn(*j(bad, PL, RW, RL), beta=0.1, mask=jnp.asarray(mask))
        full, _ = fn(*j(PW[mask], PL[mask], RW[mask], RL[mask]), beta=0.1)
        assert float(loss) == pytest.approx(float(full), rel=1e-6)
        assert float(m["num_examples"]) == 3


def test_registry_passes_config_hyperparameters():
    from configs.base import get_config
    hp = get_config().loss
    hp.beta, hp.discopop_tau = 0.3, 0.2
    stats = dict(zip(("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                      "reference_rejected_logps"), j(PW, PL, RW, RL)), valid=jnp.ones(5, bool))
    got, _ = get_loss("discopop")(stats, hp)
    want, _ = discopop_loss(*j(PW, PL, RW, RL), beta=0.3, tau=0.2)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    for name, fn in (("apo_zero", apo_zero_loss), ("apo_down", apo_down_loss)):
        assert float(get_loss(name)(stats, hp)[0]) == pytest.approx(float(fn(*j(PW, PL, RW, RL), beta=0.3)[0]))


@pytest.mark.parametrize("name,fn,kwargs", [
    ("discopop", discopop_loss, {"tau": 0.05}),
    ("discopop", discopop_loss, {"tau": 0.5}),
    ("apo_zero", apo_zero_loss, {}),
    ("apo_down", apo_down_loss, {}),
])
def test_matches_trl_1_16(name, fn, kwargs):
    """The same log-probs through TRL 1.16's DPOTrainer._compute_loss (loss_type=name)."""
    trl_harness = pytest.importorskip("trl_harness")
    beta = 0.7
    want, logged = trl_harness.trl_dpo(name, PW, PL, RW, RL, beta=beta,
                                       discopop_tau=kwargs.get("tau", 0.05))
    loss, m = fn(*j(PW, PL, RW, RL), beta=beta, **kwargs)
    s = summarize_metrics(m)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    for ours, theirs in (("rewards/desirable", "rewards/chosen"), ("rewards/undesirable", "rewards/rejected"),
                         ("rewards/margins", "rewards/margins"), ("rewards/accuracies", "rewards/accuracies"),
                         ("logps/desirable", "logps/chosen"), ("logps/undesirable", "logps/rejected")):
        np.testing.assert_allclose(s[ours], logged[theirs], rtol=1e-5, atol=1e-6, err_msg=ours)
