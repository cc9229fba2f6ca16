"""Temporal Fisher sensitivity of a DiT (AdaTSQ's Fisher-guided calibration, methods.md §2.2).

For every sampler step ``t`` (the DDIM timesteps of ``steps`` steps, in sampling order, so step
``i`` is the calibration batch's ``group`` ``i``) and every block linear ``l``::

    I_{t,l} = mean_j ‖∂L_t(x0_j, ε_j, y_j) / ∂W_l‖²_F

the empirical Fisher (mean squared *per-sample* gradient) of the model's own denoising loss
``L_t = mean((f(x_t, t, y) − target)²)`` with ``x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε`` and the target of
the schedule's prediction type (ε, x0 or v = √ᾱ_t ε − √(1 − ᾱ_t) x0). ``x0`` are clean samples
(the fp model's own samples or training images) with their class labels.
:func:`jaxquant.algorithms.adatsq.fisher_weights` turns the scores into ``α_{t,l}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.diffusion.schedules import NoiseSchedule


def block_linear_paths(params: dict) -> list[str]:
    """``layers/<b>/<linear>`` of every block linear of a DiT's params."""
    from jaxquant.models.dit.model import DIT_BLOCK_LINEARS, num_blocks

    return [f"layers/{b}/{lin}" for b in range(num_blocks(params)) for lin in DIT_BLOCK_LINEARS]


def temporal_fisher(cfg, params: dict, schedule: NoiseSchedule, x0, labels, *, steps: int,
                    n_per_step: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """``{layers/<b>/<linear>: I [steps]}`` (float64) for a class-conditional DiT."""
    from jaxquant.models.blockspec import get_path
    from jaxquant.models.dit.model import dit_forward

    x0 = np.asarray(x0, np.float32)
    labels = np.asarray(labels, np.int32)
    if x0.ndim != 4 or labels.shape != (x0.shape[0],):
        raise ValueError(f"temporal_fisher: x0 must be [n, C, H, W] with labels [n], got "
                         f"{x0.shape} and {labels.shape}")
    tab = schedule.ddim_tables(steps)
    ts, abar = np.asarray(tab["timesteps"]), np.asarray(tab["alpha_t"])
    pt = schedule.prediction_type
    paths = block_linear_paths(params)
    blocks = params["transformer_blocks"]

    def kernels(p):
        return {path: get_path(p["transformer_blocks"][int(path.split("/")[1])],
                               path.split("/", 2)[2])["kernel"] for path in paths}

    def with_kernels(ks):
        new = [jax.tree.map(lambda a: a, blk) for blk in blocks]
        for path, k in ks.items():
            b, lin = int(path.split("/")[1]), path.split("/", 2)[2]
            node = new[b]
            *head, last = lin.split("/")
            for key in head:
                node[key] = dict(node[key])
                node = node[key]
            node[last] = dict(node[last], kernel=k)
        return {**params, "transformer_blocks": new}

    def loss_one(ks, x0j, epsj, yj, t, a):
        xt = jnp.sqrt(a) * x0j + jnp.sqrt(1.0 - a) * epsj
        out = dit_forward(cfg, with_kernels(ks), xt[None], jnp.full((1,), t, jnp.float32),
                          yj[None])[0, :x0j.shape[0]]
        target = {"epsilon": epsj, "sample": x0j}.get(pt, jnp.sqrt(a) * epsj
                                                      - jnp.sqrt(1.0 - a) * x0j)
        return jnp.mean(jnp.square(out - target))

    @jax.jit
    def scores(ks, x0b, epsb, yb, t, a):
        g = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0, 0, None, None))(ks, x0b, epsb, yb,
                                                                              t, a)
        return {k: jnp.mean(jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=1))
                for k, v in g.items()}

    ks = jax.tree.map(jnp.asarray, kernels(params))
    rng = np.random.default_rng(seed)
    out = {p: np.zeros(len(ts)) for p in paths}
    for i, (t, a) in enumerate(zip(ts, abar, strict=True)):
        idx = rng.choice(x0.shape[0], size=min(n_per_step, x0.shape[0]), replace=False)
        eps = rng.standard_normal(x0[idx].shape).astype(np.float32)
        sc = scores(ks, jnp.asarray(x0[idx]), jnp.asarray(eps), jnp.asarray(labels[idx]),
                    jnp.float32(t), jnp.float32(a))
        for p in paths:
            out[p][i] = float(sc[p])
    return out
