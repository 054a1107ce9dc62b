"""The eval line's reward accuracy for unpaired KTO: r on its label's side of z0, by hand."""

import numpy as np
import pytest

from kto_jax.losses import kto
from kto_jax.losses.common import summarize_metrics


def test_kto_reward_accuracy_by_hand():
    policy = np.array([-10.0, -12.0, -9.0, -15.0, -11.0], np.float32)
    reference = np.array([-11.0, -11.5, -9.5, -14.0, -11.0], np.float32)
    policy_kl = np.array([-20.0, -21.0, -19.0, -22.0, -20.0], np.float32)
    reference_kl = np.array([-20.2, -21.1, -19.0, -22.3, -20.4], np.float32)
    desirable = np.array([True, True, False, False, True])
    mask = np.array([True, True, True, True, False])
    z0 = max(0.0, float(np.mean((policy_kl - reference_kl)[mask])))      # 0.15
    r = policy - reference                                               # [1, -0.5, 0.5, -1, 0]
    hits = np.where(desirable, r > z0, r < z0)[mask]                    # [T, F, F, T]
    _, metrics = kto.kto_loss(policy, reference, policy_kl, reference_kl, desirable, mask=mask)
    out = summarize_metrics({k: np.asarray(v) for k, v in metrics.items()})
    assert out["kl"] == pytest.approx(z0, abs=1e-6)
    assert out["rewards/accuracies"] == pytest.approx(hits.mean()) == 0.5
