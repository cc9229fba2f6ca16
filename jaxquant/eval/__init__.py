"""Evaluation: perplexity (the protocol's), KL divergence to a reference model."""

from jaxquant.eval.perplexity import (
    kl_divergence,
    model_logits_fn,
    nll_sum_and_count,
    perplexity,
)

__all__ = ["kl_divergence", "model_logits_fn", "nll_sum_and_count", "perplexity"]
