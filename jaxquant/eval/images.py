"""Sample-quality metrics for generated images: MSE, PSNR, the Fréchet distance between
Gaussian fits of features (FID's formula, on whatever feature extractor is given), and
classifier accuracy.

All are computed in float64 numpy on the host (inputs may be numpy or jax arrays) and return
Python floats (or float64 numpy arrays for the statistics).
"""

from __future__ import annotations

import math

import numpy as np


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("a and b are empty")
    return a, b


def sample_mse(a, b) -> float:
    """Mean over all elements of ``(a - b) ** 2``; ``a``, ``b`` of one shape (e.g. ``[N, H, W]``
    samples of an fp and a quantized model from the same noise)."""
    a, b = _pair(a, b)
    return float(np.mean(np.square(a - b)))


def psnr(a, b, data_range: float) -> float:
    """``10 log10(data_range ** 2 / MSE)`` in dB over all elements; ``inf`` when ``a == b``.

    ``data_range``: the span of valid values (255 for uint8 images, 2 for ``[-1, 1]``).
    """
    data_range = float(data_range)
    if not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a positive finite number, got {data_range}")
    mse = sample_mse(a, b)
    if mse == 0.0:
        return math.inf
    return float(10.0 * math.log10(data_range * data_range / mse))


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], Sigma [D, D])`` of ``features`` ``[N, D]``: the mean and the unbiased
    (``N - 1``) covariance, float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"features needs at least 2 rows for a covariance, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise ValueError("features contains NaN or inf")
    mu = f.mean(axis=0)
    centered = f - mu[None, :]
    sigma = centered.T @ centered / (f.shape[0] - 1)
    return mu, 0.5 * (sigma + sigma.T)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root (eigenvalues below 0 from round-off clipped to 0)."""
    w, v = np.linalg.eigh(0.5 * (s + s.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))[None, :]) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet (2-Wasserstein squared) distance between ``N(mu1, sigma1)`` and
    ``N(mu2, sigma2)``: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``.

    ``mu`` ``[D]``, ``sigma`` ``[D, D]`` symmetric PSD. ``tr((S1 S2)^(1/2))`` is computed as
    ``sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``, a symmetric PSD eigenproblem with the same
    eigenvalues as ``S1 S2`` (no complex parts, no ill-conditioned ``sqrtm``); round-off below 0
    is clipped, so the result is ``>= 0``.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be [D] of one D, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must be [{d}, {d}], got {s1.shape} and {s2.shape}")
    for name, x in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        scale = max(float(np.abs(s).max()), 1e-300)
        if float(np.abs(s - s.T).max()) > 1e-6 * scale:
            raise ValueError(f"{name} is not symmetric")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu1 - mu2
    fd = float(diff @ diff) + float(np.trace(s1)) + float(np.trace(s2)) - 2.0 * tr_covmean
    return max(fd, 0.0)


def classifier_accuracy(logits, labels) -> float:
    """Fraction of rows of ``logits`` ``[N, K]`` whose argmax is ``labels`` ``[N]`` (ints in
    ``[0, K)``)."""
    z = np.asarray(logits)
    y = np.asarray(labels)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"logits must be [N, K] and labels [N], got {z.shape} and {y.shape}")
    if z.shape[0] == 0:
        raise ValueError("logits and labels are empty")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got [{y.min()}, {y.max()}]")
    return float(np.mean(np.argmax(z, axis=1) == y))
