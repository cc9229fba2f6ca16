"""Image sample metrics against closed forms."""

import math

import numpy as np
import pytest

from jaxquant.eval.images import (
    classifier_accuracy,
    feature_stats,
    frechet_distance,
    psnr,
    sample_mse,
)


def test_identical_sets():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(8, 28, 28))
    assert sample_mse(x, x) == 0.0
    assert psnr(x, x, 255.0) == math.inf
    f = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    mu, s = feature_stats(f)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)


def test_psnr_of_a_constant_offset():
    x = np.random.default_rng(1).uniform(0, 200, size=(4, 28, 28)).astype(np.float32)
    y = x + np.float32(5.0)
    assert sample_mse(x, y) == pytest.approx(25.0, rel=1e-6)
    assert psnr(x, y, 255.0) == pytest.approx(20 * math.log10(255.0 / 5.0), rel=1e-6)
    assert psnr(x, y, 255.0) == pytest.approx(10 * math.log10(255.0 ** 2 / 25.0), rel=1e-6)
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, y, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        sample_mse(x, y[:2])


def test_feature_stats_is_mean_and_unbiased_covariance():
    f = np.random.default_rng(2).standard_normal((50, 6))
    mu, s = feature_stats(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(s, np.cov(f, rowvar=False), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(f[:1])


def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(3)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.01, 3, d), rng.uniform(0.01, 3, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(want, rel=1e-10)


def test_commuting_covariances_closed_form():
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: tr((S1 S2)^(1/2)) = sum sqrt(a b)."""
    rng = np.random.default_rng(4)
    d = 10
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 5, d), rng.uniform(0.1, 5, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    # symmetric in its two arguments, and matches scipy's sqrtm where that is well conditioned
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-9)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    m = scipy_linalg.sqrtm(s1 @ s2)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(m.real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)


def test_frechet_singular_covariances_and_bad_input():
    """Rank-deficient covariances (N < D, as with few samples) stay finite and >= 0."""
    rng = np.random.default_rng(5)
    f1, f2 = rng.standard_normal((5, 20)), rng.standard_normal((5, 20)) + 0.5
    fd = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    assert np.isfinite(fd) and fd > 0
    mu, s = feature_stats(f1)
    assert frechet_distance(mu, s, mu, s) < 1e-9
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu, s, mu, s[:3, :3])
    bad = s.copy()
    bad[0, 1] += 1.0
    with pytest.raises(ValueError, match="sigma1 is not symmetric"):
        frechet_distance(mu, bad, mu, s)


def test_classifier_accuracy():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 5.0, 0.0], [9.0, 0.0, 0.0]])
    assert classifier_accuracy(logits, np.array([0, 2, 1, 1])) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="labels"):
        classifier_accuracy(logits, np.array([0, 2, 1, 3]))
    with pytest.raises(ValueError, match="logits"):
        classifier_accuracy(logits[:, 0], np.array([0, 2, 1, 1]))
