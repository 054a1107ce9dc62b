"""Imbalance controls: exact seeded subsampling, eq. 9 weights and the ratio warning."""

import numpy as np
import pytest

from kto_jax.data import imbalance


def test_subsample_keeps_exact_counts_with_a_seed():
    labels = np.array([True] * 100 + [False] * 50)
    keep = imbalance.subsample_classes(labels, 0.1, 1.0, seed=3)
    assert labels[keep].sum() == 10 and (~labels[keep]).sum() == 50
    assert np.all(np.diff(keep) > 0)                                   # file order kept
    assert np.array_equal(keep, imbalance.subsample_classes(labels, 0.1, 1.0, seed=3))
    assert not np.array_equal(keep, imbalance.subsample_classes(labels, 0.1, 1.0, seed=4))
    both = imbalance.subsample_classes(labels, 0.5, 0.2, seed=0)
    assert labels[both].sum() == 50 and (~labels[both]).sum() == 10
    assert len(imbalance.subsample_classes(labels, 0.0, 1.0, seed=0)) == 50


def test_balanced_weights_follow_the_papers_example():
    # §4.3: dropping 90% of desirable data (1:10) -> lambda_U = 1, lambda_D = 13.33.
    lam_d, lam_u = imbalance.balanced_weights(100, 1000)
    assert lam_u == 1.0 and lam_d == pytest.approx(13.333333, rel=1e-6)
    assert imbalance.weight_ratio(lam_d, lam_u, 100, 1000) == pytest.approx(4 / 3)
    assert imbalance.balanced_weights(120, 100) == (1.0, 1.0)          # 1.2 already in [1, 4/3]
    lam_d, lam_u = imbalance.balanced_weights(400, 100)                # desirable majority
    assert lam_d == 1.0 and 400 / (lam_u * 100) == pytest.approx(4 / 3)
    assert imbalance.balanced_weights(0, 10) is None


def test_ratio_warning_outside_the_interval_only():
    assert imbalance.ratio_warning(1.0, 1.0, 110, 100) is None
    message = imbalance.ratio_warning(1.0, 1.0, 100, 1000)
    assert "outside" in message and "auto_weights" in message
    assert imbalance.ratio_warning(13.0, 1.0, 100, 1000) is None        # 1.3 is inside
    assert "no desirable examples" in imbalance.ratio_warning(1.0, 1.0, 0, 10)
    assert imbalance.weight_ratio(1.0, 1.0, 10, 0) is None
