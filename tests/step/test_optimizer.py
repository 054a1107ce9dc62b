"""The optax optimizer and schedule built from config.optim."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from kto_jax.errors import UserError
from kto_jax.step.optimizer import make_optimizer, make_schedule


def _optim(**kw):
    c = get_config().optim
    for k, v in kw.items():
        c[k] = v
    return c


def test_warmup_then_constant():
    sched = make_schedule(_optim(lr=1e-3, warmup_steps=4, schedule="constant"), 100)
    got = [float(sched(s)) for s in (0, 1, 2, 4, 50)]
    np.testing.assert_allclose(got, [0.0, 2.5e-4, 5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_warmup_then_cosine_reaches_zero():
    sched = make_schedule(_optim(lr=1e-3, warmup_steps=2, schedule="cosine"), 12)
    # cosine over 10 steps after warmup: lr/2 (1 + cos(pi t / 10))
    want = [1e-3 * 0.5 * (1 + np.cos(np.pi * t / 10)) for t in (0, 5, 10)]
    np.testing.assert_allclose([float(sched(s)) for s in (2, 7, 12)], want, rtol=1e-5, atol=1e-12)


def test_adamw_default_matches_hand_update_with_clipping():
    opt, _ = make_optimizer(_optim(lr=0.1, warmup_steps=0, max_grad_norm=1.0), 10)
    params = {"w": jnp.array([1.0, 2.0])}
    grads = {"w": jnp.array([3.0, 4.0])}  # norm 5 -> clipped to [0.6, 0.8]
    upd, _ = opt.update(grads, opt.init(params), params)
    # first Adam step: m/(sqrt(v)+eps) = sign(g) after bias correction
    np.testing.assert_allclose(upd["w"], [-0.1, -0.1], rtol=1e-5)


def test_rmsprop_eps_outside_sqrt_like_torch():
    opt, _ = make_optimizer(_optim(name="rmsprop", lr=0.1, warmup_steps=0, b2=0.9,
                                   eps=1e-2, max_grad_norm=0.0), 10)
    params = {"w": jnp.array([1.0])}
    upd, _ = opt.update({"w": jnp.array([2.0])}, opt.init(params), params)
    nu = 0.1 * 4.0
    np.testing.assert_allclose(upd["w"], [-0.1 * 2.0 / (np.sqrt(nu) + 1e-2)], rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(name="sgd"), dict(schedule="linear"),
                                dict(schedule="cosine", warmup_steps=10),
                                dict(max_grad_norm=-1.0)])
def test_bad_optim_config_is_a_user_error(kw):
    with pytest.raises(UserError, match="config.optim"):
        make_optimizer(_optim(**kw), 10)
