"""Evaluate a (quantized) class-conditional DiT against its fp reference: samples from the same
noise and classes, scored by PSNR / MSE to the reference's samples and, with the Fashion-MNIST
classifier (:mod:`jaxquant.eval.classifier`), class accuracy and the Fréchet distance of its
features to the real test images."""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


def find_scheduler(path: str) -> str | None:
    """``scheduler/scheduler_config.json`` in ``path`` or beside it (a pipeline directory)."""
    for d in (path, os.path.dirname(os.path.normpath(path))):
        f = os.path.join(d, "scheduler", "scheduler_config.json")
        if os.path.isfile(f):
            return f
    return None


def evaluate_dit(model, reference, *, classifier_dir: str | None = None, per_class: int = 10,
                 steps: int = 25, guidance: float = 1.5, seed: int = 0,
                 data_root: str | None = None) -> dict:
    """Scores of ``model`` against ``reference`` (both :class:`DiffusionTransformer`, same config).

    Returns ``{"psnr", "mse", "acc", "acc_ref", "fd", "fd_ref", "samples", "seconds"}`` (the
    classifier entries only with ``classifier_dir``)."""
    from jaxquant.diffusion.calibration import sample_dit
    from jaxquant.diffusion.schedules import NoiseSchedule
    from jaxquant.eval.images import feature_stats, frechet_distance, psnr, sample_mse

    t0 = time.perf_counter()
    cfg = model.config
    if cfg != reference.config:
        raise ValueError("evaluate: the model and its reference have different configs")
    sf = find_scheduler(model.path) or find_scheduler(reference.path)
    if sf is None:
        raise FileNotFoundError(f"{model.path}: no scheduler/scheduler_config.json here or beside "
                                f"the reference {reference.path}")
    with open(sf) as f:
        sched = NoiseSchedule.from_config(json.load(f), ignore_unknown=True)
    labels = np.repeat(np.arange(cfg.num_classes, dtype=np.int32), per_class)

    def draw(params):
        f = jax.jit(lambda y: sample_dit(cfg, params, sched, y, steps=steps, guidance=guidance,
                                         seed=seed))
        return np.clip(np.asarray(f(labels)), -1.0, 1.0)

    q, r = draw(model.params), draw(reference.params)
    out = {"psnr": float(psnr(q, r, data_range=2.0)), "mse": float(sample_mse(q, r)),
           "samples": len(labels), "steps": steps}
    if classifier_dir is not None:
        from jaxquant.data.images import fashion_mnist
        from jaxquant.eval.classifier import load_classifier, make_apply, to_unit_range

        cp, _ = load_classifier(classifier_dir)
        logits, feats = make_apply(cp), make_apply(cp, features=True)
        xte, _ = fashion_mnist("test", root=data_root)
        mu_r, s_r = feature_stats(feats(to_unit_range(xte)))
        for key, s in (("", q), ("_ref", r)):
            out[f"acc{key}"] = float(np.mean(np.argmax(logits(s), -1) == labels))
            mu, sig = feature_stats(feats(s))
            out[f"fd{key}"] = float(frechet_distance(mu, sig, mu_r, s_r))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
