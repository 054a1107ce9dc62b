"""The loss registry contract, additive metrics / summarize_metrics, and eq. 9 weights."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from kto_jax.errors import UserError
from kto_jax.losses import (LOSS_NAMES, add_metrics, balanced_weights, dpo_loss, get_loss,
                            microbatch_means, resolve_weights, summarize_metrics, weight_ratio,
                            weight_ratio_in_range, weight_ratio_warning)

M, C = 6, 5


def make_stats(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(-8.0, 2.0, shape), jnp.float32)  # noqa: E731
    completion_mask = (np.arange(C)[None] < np.array([5, 3, 4, 2, 5, 1])[:, None]).astype(np.int32)
    return {
        "policy_logps": f(M), "reference_logps": f(M), "policy_kl_logps": f(M),
        "reference_kl_logps": f(M), "policy_token_counts": jnp.asarray(completion_mask.sum(1), jnp.float32),
        "desirable": jnp.asarray([1, 0, 1, 1, 0, 1], bool), "weight": jnp.ones(M),
        "valid": jnp.asarray([1, 1, 1, 1, 1, 0], bool),
        "policy_chosen_logps": f(M), "policy_rejected_logps": f(M), "reference_chosen_logps": f(M),
        "reference_rejected_logps": f(M), "chosen_token_counts": jnp.full(M, 4.0),
        "rejected_token_counts": jnp.full(M, 3.0),
        "policy_token_logps": f(M, C) / 8.0, "reference_token_logps": f(M, C) / 8.0,
        "completion_mask": jnp.asarray(completion_mask), "values": f(M, C) / 8.0,
        "policy_kl_token_logps": f(M, C) / 8.0, "reference_kl_token_logps": f(M, C) / 8.0,
        "kl_completion_mask": jnp.asarray(np.roll(completion_mask, -1, axis=0)),
        "bco_delta": jnp.float32(0.25), "bco_count": jnp.int32(40),
    }


def test_config_comment_lists_exactly_the_registered_losses():
    text = Path(__file__).resolve().parents[2].joinpath("configs", "base.py").read_text()
    line = next(ln for ln in text.splitlines() if "c.loss.name" in ln)
    names = [n.strip() for n in line.split("#", 1)[1].split("|")]
    assert tuple(names) == LOSS_NAMES
    assert get_config().loss.name in LOSS_NAMES


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_honours_the_contract(name):
    loss_fn = get_loss(name)
    hp = get_config().loss
    stats = make_stats()
    state_keys = tuple(loss_fn.initial_loss_state())
    assert set(loss_fn.stat_keys + state_keys) <= set(stats)
    stats = {k: stats[k] for k in loss_fn.stat_keys + state_keys}
    loss, metrics = jax.jit(lambda s: loss_fn(s, hp))(stats)
    assert np.isfinite(float(loss))
    for key in ("loss_sum", "loss_denominator", "num_examples"):
        assert key in metrics
    for key, value in metrics.items():
        assert value.shape == () and value.dtype == jnp.float32, key
        assert key.endswith("_sum") or key.startswith("count/") or key in ("loss_denominator", "num_examples"), key
    assert float(loss) == pytest.approx(float(metrics["loss_sum"]) / max(float(metrics["loss_denominator"]), 1.0),
                                        rel=1e-5)
    expected_n = 5.0 if name not in ("sft",) else 3.0  # sft: valid desirable rows only
    assert float(metrics["num_examples"]) == expected_n
    assert loss_fn.paired == (name in ("dpo", "ipo", "orpo", "simpo", "slic", "discopop", "apo_zero", "apo_down"))
    assert loss_fn.uses_kl == any(k.startswith("policy_kl_") for k in loss_fn.stat_keys)
    assert loss_fn.uses_reference == any(k.startswith("reference") for k in loss_fn.stat_keys)
    assert loss_fn.uses_token_logps == ("policy_token_logps" in loss_fn.stat_keys)
    assert loss_fn.uses_value_head == (name == "ppo_offline")
    assert bool(state_keys) == (name == "bco")
    summary = summarize_metrics(metrics)
    assert all(np.isfinite(v) for v in summary.values())


def test_registry_errors():
    with pytest.raises(UserError, match="unknown loss 'kto2'.*kto_no_z0"):
        get_loss("kto2")
    with pytest.raises(KeyError, match="policy_kl_logps"):
        get_loss("kto")({"policy_logps": jnp.zeros(2)}, get_config().loss)


def test_registry_kto_uses_kl_valid_and_config_weights():
    hp = get_config().loss
    hp.beta, hp.desirable_weight, hp.undesirable_weight = 0.3, 2.0, 0.5
    s = make_stats()
    s["kl_valid"] = jnp.asarray([1, 1, 1, 1, 0, 0], bool)
    from kto_jax.losses import kto_loss
    want, _ = kto_loss(s["policy_logps"], s["reference_logps"], s["policy_kl_logps"], s["reference_kl_logps"],
                       s["desirable"], beta=0.3, desirable_weight=2.0, undesirable_weight=0.5,
                       mask=s["valid"], kl_mask=s["kl_valid"])
    got, _ = get_loss("kto")(s, hp)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_summarize_metrics_by_hand():
    summed = {"loss_sum": 3.0, "loss_denominator": 4.0, "num_examples": 4.0, "count/desirable": 3.0,
              "count/undesirable": 0.0, "rewards/desirable_sum": 0.6, "rewards/undesirable_sum": 0.0,
              "logps/desirable_sum": -30.0, "logps/undesirable_sum": 0.0, "kl_sum": 2.0,
              "rewards/accuracies_sum": 1.0, "ppo/kl_token_sum": 1.5, "count/tokens": 10.0,
              "orpo/log_odds_sum": 2.0}
    s = summarize_metrics({k: jnp.float32(v) for k, v in summed.items()})
    assert s["loss"] == pytest.approx(0.75) and s["kl"] == pytest.approx(0.5)
    assert s["rewards/desirable"] == pytest.approx(0.2) and s["logps/desirable"] == pytest.approx(-10.0)
    # no undesirable row: its means and the margin are absent, not 0
    assert not {"rewards/undesirable", "logps/undesirable", "rewards/margins"} & set(s)
    assert s["rewards/accuracies"] == pytest.approx(0.25) and s["ppo/kl"] == pytest.approx(0.15)
    assert s["orpo/log_odds"] == pytest.approx(0.5)
    assert s["count/desirable"] == 3.0 and s["count/undesirable"] == 0.0 and s["num_examples"] == 4.0


def _microbatch(rewards_d, rewards_u):
    """Additive metrics of one microbatch with the given rewards per class (loss = 1 per row)."""
    n = len(rewards_d) + len(rewards_u)
    m = {"loss_sum": float(n), "loss_denominator": float(n), "num_examples": float(n),
         "count/desirable": float(len(rewards_d)), "count/undesirable": float(len(rewards_u)),
         "rewards/desirable_sum": float(sum(rewards_d)), "rewards/undesirable_sum": float(sum(rewards_u)),
         "kl_sum": 0.5 * n}
    return microbatch_means({k: jnp.float32(v) for k, v in m.items()})


def test_window_with_one_class_per_step_pools_by_counts_or_averages_microbatch_means():
    """Two steps, one class each: the pooled window means use the counts; TRL's averaging
    (summarize_metrics(averaging="microbatch")) is the mean over the microbatches that hold
    the class of each one's mean, and the margin exists only where a microbatch has both."""
    a = _microbatch([1.0, 2.0, 3.0], [])          # desirable only: mean 2
    b = _microbatch([], [-1.0])                   # undesirable only: mean -1
    c = _microbatch([5.0], [-3.0, -5.0])          # both: means 5 and -4, margin 9
    assert "rewards/margins" not in summarize_metrics(a)
    assert "rewards/undesirable" not in summarize_metrics(a)
    pooled = summarize_metrics(add_metrics(a, b))
    assert pooled["rewards/desirable"] == pytest.approx(2.0) and pooled["rewards/undesirable"] == -1.0
    assert pooled["rewards/margins"] == pytest.approx(3.0)     # of the pooled means
    assert not any(k.startswith("microbatch/") or k.startswith("count/microbatch/") for k in pooled)
    trl = summarize_metrics(add_metrics(a, b), averaging="microbatch")
    assert trl["rewards/desirable"] == pytest.approx(2.0) and trl["rewards/undesirable"] == -1.0
    assert "rewards/margins" not in trl                        # no microbatch had both classes
    total = add_metrics(add_metrics(a, b), c)
    pooled, trl = summarize_metrics(total), summarize_metrics(total, averaging="microbatch")
    assert pooled["rewards/desirable"] == pytest.approx(11.0 / 4)          # (1+2+3+5) / 4 rows
    assert trl["rewards/desirable"] == pytest.approx((2.0 + 5.0) / 2)      # mean of a's and c's means
    assert pooled["rewards/undesirable"] == pytest.approx(-9.0 / 3)
    assert trl["rewards/undesirable"] == pytest.approx((-1.0 - 4.0) / 2)
    assert trl["rewards/margins"] == pytest.approx(9.0)                     # c alone
    assert trl["loss"] == pytest.approx(1.0) and trl["kl"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="averaging"):
        summarize_metrics(total, averaging="trl")


def test_metrics_of_microbatches_add_up_to_the_whole_batch():
    """Pair losses have no batch-level coupling: accumulated sums equal the whole batch's."""
    s = make_stats(1)
    keys = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
    whole_loss, whole = dpo_loss(*(s[k] for k in keys), mask=s["valid"])
    la, ma = dpo_loss(*(s[k][:2] for k in keys), mask=s["valid"][:2])
    lb, mb = dpo_loss(*(s[k][2:] for k in keys), mask=s["valid"][2:])
    total = add_metrics(ma, mb)
    for k in whole:
        np.testing.assert_allclose(float(total[k]), float(whole[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    da, db = float(ma["num_examples"]), float(mb["num_examples"])
    assert (float(la) * da + float(lb) * db) / (da + db) == pytest.approx(float(whole_loss), rel=1e-5)


def test_balanced_weights_eq9():
    # the paper's 1:10 example: lambda_U = 1, lambda_D = 13.33
    lam_d, lam_u = balanced_weights(100, 1000)
    assert lam_u == 1.0 and lam_d == pytest.approx(13.333333, rel=1e-6)
    assert weight_ratio(100, 1000, lam_d, lam_u) == pytest.approx(4 / 3)
    # desirable majority beyond 4/3: lambda_D stays 1, lambda_U rises
    lam_d, lam_u = balanced_weights(1000, 100)
    assert lam_d == 1.0 and lam_u == pytest.approx(7.5)
    assert weight_ratio_in_range(1000, 100, lam_d, lam_u)
    assert balanced_weights(500, 500) == (1.0, 1.0)          # ratio 1: already in range
    assert balanced_weights(130, 100) == (1.0, 1.0)          # ratio 1.3: already in range
    assert balanced_weights(7, 0) == (1.0, 1.0)              # one class: nothing to balance
    assert balanced_weights(100, 1000, target=1.0) == (10.0, 1.0)
    for n_d, n_u in [(1, 7), (3, 5), (9, 2), (1000, 999), (2, 3)]:
        assert weight_ratio_in_range(n_d, n_u, *balanced_weights(n_d, n_u))
    assert not weight_ratio_in_range(100, 1000, 1.0, 1.0)
    assert not weight_ratio_in_range(150, 100, 1.0, 1.0)
    with pytest.raises(UserError):
        balanced_weights(10, 10, target=2.0)


def test_weight_warning_and_resolve():
    assert weight_ratio_warning(100, 100, 1.0, 1.0) is None
    msg = weight_ratio_warning(100, 1000, 1.0, 1.0)
    assert "eq. 9" in msg and "desirable_weight=13.33" in msg
    cfg = get_config().loss
    assert resolve_weights(cfg, 100, 1000).desirable_weight == 1.0  # auto_weights off
    cfg.auto_weights = True
    out = resolve_weights(cfg, 100, 1000)
    assert out.desirable_weight == pytest.approx(40 / 3) and out.undesirable_weight == 1.0
    assert cfg.desirable_weight == 1.0  # the input config is not modified
