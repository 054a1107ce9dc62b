"""SFT, CSFT and offline PPO (App. C) against numpy hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.losses import (add_control_token, csft_loss, csft_sampling_prompt, gae,
                            init_value_head, ppo_offline_loss, sft_desirable_loss, sft_loss,
                            summarize_metrics, terminal_rewards, value_head_apply)

LOGPS = np.array([-6.0, -10.0, -3.0, -8.0], np.float32)
COUNTS = np.array([3.0, 4.0, 2.0, 5.0], np.float32)
DESIRABLE = np.array([True, False, True, True])
ppo_jit = jax.jit(ppo_offline_loss)


def test_sft_token_mean_nll_on_desirable_only():
    valid = np.array([True, True, True, False])
    loss, m = sft_desirable_loss(jnp.asarray(LOGPS), jnp.asarray(COUNTS), jnp.asarray(DESIRABLE),
                                 mask=jnp.asarray(valid))
    # desirable & valid: rows 0 and 2 -> (6 + 3) / (3 + 2)
    assert float(loss) == pytest.approx(9.0 / 5.0, rel=1e-6)
    assert float(m["loss_denominator"]) == 5.0 and float(m["num_examples"]) == 2.0
    assert summarize_metrics(m)["loss"] == pytest.approx(1.8, rel=1e-6)


def test_sft_token_mean_is_exact_under_accumulation():
    """Weighting microbatch losses by loss_denominator reproduces the whole-batch token mean."""
    la, ma = sft_loss(jnp.asarray(LOGPS[:2]), jnp.asarray(COUNTS[:2]))
    lb, mb = sft_loss(jnp.asarray(LOGPS[2:]), jnp.asarray(COUNTS[2:]))
    whole, _ = sft_loss(jnp.asarray(LOGPS), jnp.asarray(COUNTS))
    da, db = float(ma["loss_denominator"]), float(mb["loss_denominator"])
    assert (float(la) * da + float(lb) * db) / (da + db) == pytest.approx(float(whole), rel=1e-6)
    assert float(whole) == pytest.approx(27.0 / 14.0, rel=1e-6)


def test_csft_trains_both_classes_and_control_tokens():
    loss, m = csft_loss(jnp.asarray(LOGPS), jnp.asarray(COUNTS), jnp.asarray(DESIRABLE))
    assert float(loss) == pytest.approx(27.0 / 14.0, rel=1e-6)
    assert float(m["count/undesirable"]) == 1.0 and float(m["count/desirable"]) == 3.0
    assert add_control_token(" Sure.", True) == "<|good|> Sure."
    assert add_control_token(" No.", False) == "<|bad|> No."
    assert csft_sampling_prompt("Q: hi\nA:") == "Q: hi\nA:<|good|>"


def test_terminal_rewards_and_gae_against_a_loop():
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
    desirable = np.array([True, False, True])
    values = np.array([[0.1, -0.2, 0.3, 9.0], [0.5, 0.4, 9.0, 9.0], [0.0, 0.2, -0.1, 0.3]], np.float32)
    gamma, lam = 0.9, 0.8
    rewards = np.asarray(terminal_rewards(jnp.asarray(desirable), jnp.asarray(mask)))
    np.testing.assert_array_equal(rewards, [[0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    v = values * mask
    adv = np.zeros_like(v)
    ret = np.zeros_like(v)
    for row in range(3):
        a = g = 0.0
        for t in reversed(range(4)):
            v_next = v[row, t + 1] if t < 3 else 0.0
            a = rewards[row, t] + gamma * v_next - v[row, t] + gamma * lam * a
            g = rewards[row, t] + gamma * g
            adv[row, t], ret[row, t] = a * mask[row, t], g * mask[row, t]
    got_adv, got_ret = jax.jit(gae)(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    np.testing.assert_allclose(np.asarray(got_adv), adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_ret), ret, rtol=1e-5, atol=1e-6)
    # the desirable 3-token row: returns 0.81, 0.9, 1.0
    np.testing.assert_allclose(np.asarray(got_ret)[0, :3], [0.81, 0.9, 1.0], rtol=1e-6)


def ppo_numpy(logp, ref, values, mask, desirable, clip=(0.25, 4.0), kl=0.1, critic=0.01,
              gamma=0.99, lam=0.95):
    rewards = np.asarray(terminal_rewards(jnp.asarray(desirable), jnp.asarray(mask)))
    adv, ret = (np.asarray(x) for x in jax.jit(gae)(jnp.asarray(rewards), jnp.asarray(values),
                                                    jnp.asarray(mask), gamma, lam))
    n = mask.sum()
    mean = (adv * mask).sum() / n
    var = (((adv - mean) ** 2) * mask).sum() / n
    adv = (adv - mean) / np.sqrt(var + 1e-8) * mask
    ratio = np.exp(logp - ref)
    pol = np.maximum(-adv * ratio, -adv * np.clip(ratio, *clip))
    per_token = pol + kl * (ref - logp) + critic * 0.5 * (values - ret) ** 2
    return (per_token * mask).sum() / n


def test_ppo_offline_loss_matches_hand_computation_and_clips():
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], np.float32)
    logp = rng.normal(-1.5, 0.5, (3, 5)).astype(np.float32)
    ref = rng.normal(-1.5, 0.5, (3, 5)).astype(np.float32)
    logp[1, 1] = ref[1, 1] + 2.0  # ratio e^2 = 7.4 > 4: clipped
    values = rng.normal(0, 0.3, (3, 5)).astype(np.float32)
    desirable = np.array([True, False, True])
    loss, m = ppo_jit(*(jnp.asarray(x) for x in (logp, ref, values, mask, desirable)))
    np.testing.assert_allclose(float(loss), ppo_numpy(logp, ref, values, mask, desirable), rtol=1e-5)
    s = summarize_metrics(m)
    assert s["count/tokens"] == 10 and s["num_examples"] == 3
    assert s["ppo/clipfrac"] == pytest.approx(0.1)
    # a clipped token whose advantage sign makes the clipped branch the max gets no policy gradient
    g = jax.jit(jax.grad(lambda lp: ppo_offline_loss(lp, jnp.asarray(ref), jnp.asarray(values), jnp.asarray(mask),
                                                     jnp.asarray(desirable), kl_coef=0.0)[0]))(jnp.asarray(logp))
    g = np.asarray(g)
    assert np.all(g[mask == 0] == 0.0) and np.all(np.isfinite(g))
    # expected d/dlogp of max(-A q, -A clip(q)) / n: -A q / n where the unclipped branch wins, else 0
    rewards = np.asarray(terminal_rewards(jnp.asarray(desirable), jnp.asarray(mask)))
    adv, _ = jax.jit(gae)(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 0.99, 0.95)
    a = np.asarray(adv)
    mean = (a * mask).sum() / mask.sum()
    a = (a - mean) / np.sqrt((((a - mean) ** 2) * mask).sum() / mask.sum() + 1e-8) * mask
    q = np.exp(logp - ref)
    unclipped_wins = -a * q >= -a * np.clip(q, 0.25, 4.0)
    want = np.where(unclipped_wins, -a * q, 0.0) * mask / mask.sum()
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)
    assert not unclipped_wins[1, 1] or a[1, 1] < 0  # the clipped token is handled by the clip branch


def test_ppo_kl_penalty_is_mean_token_log_ratio():
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    logp = np.array([[-1.0, -2.0, -5.0], [-0.5, -9.0, -9.0]], np.float32)
    ref = np.array([[-1.5, -1.0, 0.0], [-1.0, 0.0, 0.0]], np.float32)
    _, m = ppo_jit(*(jnp.asarray(x) for x in (logp, ref, np.zeros((2, 3), np.float32), mask,
                                              np.array([True, False]))))
    # mean over label tokens of log ref - log pi: (-0.5 + 1.0 - 0.5) / 3 = 0
    assert summarize_metrics(m)["ppo/kl"] == pytest.approx(0.0, abs=1e-7)
    _, m2 = ppo_jit(*(jnp.asarray(x) for x in (logp, ref - 0.3, np.zeros((2, 3), np.float32), mask,
                                               np.array([True, False]))))
    assert summarize_metrics(m2)["ppo/kl"] == pytest.approx(-0.3, rel=1e-5)


def test_value_head_is_a_detached_three_layer_mlp():
    params = jax.jit(init_value_head, static_argnums=1)(jax.random.key(0), 8)
    assert [params[k]["kernel"].shape for k in ("dense_0", "dense_1", "dense_2")] == [(8, 8), (8, 8), (8, 1)]
    hidden = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 8)), jnp.bfloat16)
    values = jax.jit(value_head_apply)(params, hidden)
    assert values.shape == (2, 5) and values.dtype == jnp.float32
    assert float(jnp.abs(values).max()) == 0.0  # zero-initialised last layer
    params = jax.tree.map(lambda p: p + 0.1, params)

    def critic(params, hidden):
        return jnp.sum(value_head_apply(params, hidden) ** 2)

    g_params, g_hidden = jax.jit(jax.grad(critic, argnums=(0, 1)))(params, hidden.astype(jnp.float32))
    assert float(jnp.abs(g_hidden).max()) == 0.0
    assert float(jnp.abs(g_params["dense_2"]["kernel"]).max()) > 0.0
    x = np.asarray(hidden, np.float32)
    h1 = np.maximum(x @ np.asarray(params["dense_0"]["kernel"]) + np.asarray(params["dense_0"]["bias"]), 0)
    h2 = np.maximum(h1 @ np.asarray(params["dense_1"]["kernel"]) + np.asarray(params["dense_1"]["bias"]), 0)
    want = (h2 @ np.asarray(params["dense_2"]["kernel"]) + np.asarray(params["dense_2"]["bias"]))[..., 0]
    np.testing.assert_allclose(np.asarray(jax.jit(value_head_apply)(params, hidden)), want, rtol=1e-5)
