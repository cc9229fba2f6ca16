"""Evaluation: perplexity (the protocol's), KL divergence to a reference model, and sample metrics
for diffusion models (MSE / PSNR to the fp samples, classifier accuracy, Fréchet distance)."""

from jaxquant.eval.perplexity import (
    ModelFn,
    kl_divergence,
    model_logits_fn,
    nll_per_window,
    nll_sum_and_count,
    perplexity,
)
from jaxquant.eval.images import (
    classifier_accuracy,
    feature_stats,
    frechet_distance,
    psnr,
    sample_mse,
)

__all__ = ["classifier_accuracy", "feature_stats", "frechet_distance", "psnr", "sample_mse",
           "ModelFn", "kl_divergence", "model_logits_fn", "nll_per_window", "nll_sum_and_count",
           "perplexity"]
