"""Evaluation: perplexity (the protocol's), KL divergence to a reference model."""

from jaxquant.eval.perplexity import (
    ModelFn,
    kl_divergence,
    model_logits_fn,
    nll_per_window,
    nll_sum_and_count,
    perplexity,
)

__all__ = ["ModelFn", "kl_divergence", "model_logits_fn", "nll_per_window", "nll_sum_and_count",
           "perplexity"]
