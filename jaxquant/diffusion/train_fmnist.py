"""Train the real models the DiT methods are measured on: a class-conditional DiT on Fashion-MNIST
(v-prediction, DDPM linear schedule, 10% label dropout for classifier-free guidance, EMA) and
a small classifier that judges its samples. Fixed seeds; sized to finish in under 20 minutes on
2 CPU cores.

    python -m jaxquant.diffusion.train_fmnist [--out DIR] [--steps N] [--data DIR]

Writes, outside the repository (default ``$JAXQUANT_CACHE`` or ``~/.cache/jaxquant/dit-fmnist``)::

    DIR/transformer/{config.json, diffusion_pytorch_model.safetensors}   # diffusers DiT
    DIR/scheduler/scheduler_config.json                                  # DDIMScheduler
    DIR/classifier/{classifier.safetensors, classifier.json}             # test accuracy inside
    DIR/train_log.json                                                   # losses, seconds, seeds

diffusers' ``DiTTransformer2DModel.from_pretrained(DIR, subfolder="transformer")`` and
``jaxquant.load(DIR/transformer)`` both read the transformer.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.diffusion.schedules import NoiseSchedule
from jaxquant.models.dit.config import DiTConfig

# The Fashion-MNIST DiT: 28x28x1 images, patch 4 (7x7 = 49 tokens), width 128, 4 blocks.
FMNIST_DIT = DiTConfig(kind="dit", num_heads=4, head_dim=32, in_channels=1, out_channels=1,
                       num_layers=4, sample_size=28, patch_size=4, num_classes=10,
                       num_train_timesteps=1000)
SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1",
             "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
             "beta_schedule": "linear", "clip_sample": True, "set_alpha_to_one": False,
             "steps_offset": 0, "prediction_type": "v_prediction", "timestep_spacing": "leading"}
# v-prediction (v = √ᾱ ε − √(1−ᾱ) x₀): an ε-prediction model of this size and training budget
# predicts ε too poorly at both ends of the schedule for DDIM to converge (its x₀ estimate is
# amplified by 1/√ᾱ at high noise); v keeps the x₀ error bounded at every t.


def default_dir() -> str:
    base = os.environ.get("JAXQUANT_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                         "jaxquant"))
    return os.path.join(base, "dit-fmnist")


def _eta(t0: float, done: int, total: int) -> str:
    el = time.perf_counter() - t0
    return f"{el:.0f} s, ETA {el / max(done, 1) * (total - done):.0f} s"


def train_dit(images: np.ndarray, labels: np.ndarray, *, cfg: DiTConfig = FMNIST_DIT,
              steps: int = 2000, batch_size: int = 64, lr: float = 1e-3, warmup: int = 100,
              ema_decay: float = 0.999, p_uncond: float = 0.1, seed: int = 0,
              log=print) -> tuple[dict, list[float]]:
    """Denoising training (v-prediction) on ``images`` ``[N, 1, 28, 28]`` in [-1, 1] with ``labels``
    ``[N]``.
    Returns the EMA params and the loss curve (mean per 100 steps)."""
    import optax

    from jaxquant.models.dit.export import init_dit_params
    from jaxquant.models.dit.model import dit_forward

    warmup = min(warmup, max(1, steps // 10))
    sched = NoiseSchedule.from_config(SCHEDULER)
    abar = jnp.asarray(sched.alphas_cumprod(), jnp.float32)
    params = jax.tree.map(jnp.asarray, init_dit_params(cfg, jax.random.PRNGKey(seed)))
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps,
                                                                    lr * 0.1),
                                 weight_decay=0.0))
    opt = tx.init(params)
    ema = jax.tree.map(jnp.copy, params)
    T = sched.num_train_timesteps

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, opt, ema, key, x0, y):
        kt, kn, kd = jax.random.split(key, 3)
        b = x0.shape[0]
        t = jax.random.randint(kt, (b,), 0, T)
        eps = jax.random.normal(kn, x0.shape, jnp.float32)
        a = abar[t].reshape(b, 1, 1, 1)
        xt = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps
        y = jnp.where(jax.random.uniform(kd, (b,)) < p_uncond, cfg.num_classes, y)

        v = jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0

        def loss_fn(p):
            return jnp.mean((dit_forward(cfg, p, xt, t, y) - v) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, upd)
        ema = jax.tree.map(lambda e, q: ema_decay * e + (1.0 - ema_decay) * q, ema, params)
        return params, opt, ema, loss

    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed + 1)
    curve, window = [], []
    t0 = time.perf_counter()
    for i in range(steps):
        idx = rng.integers(0, len(images), batch_size)
        key, k = jax.random.split(key)
        params, opt, ema, loss = step(params, opt, ema, k, jnp.asarray(images[idx]),
                                      jnp.asarray(labels[idx].astype(np.int32)))
        window.append(loss)
        if (i + 1) % 100 == 0:
            curve.append(float(np.mean([float(x) for x in window])))
            window = []
            log(f"dit step {i + 1}/{steps}: loss {curve[-1]:.4f} ({_eta(t0, i + 1, steps)})")
    return jax.tree.map(np.asarray, ema), curve


def main(argv=None) -> None:
    from jaxquant.data.images import fashion_mnist
    from jaxquant.eval.classifier import (
        load_classifier,
        make_apply,
        save_classifier,
        to_unit_range,
        train_classifier,
    )
    from jaxquant.models.dit.export import save_dit_diffusers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=default_dir())
    ap.add_argument("--data", default=None, help="Fashion-MNIST IDX directory")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--classifier-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-classifier", action="store_true",
                    help="keep a classifier already trained in --out")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    xtr, ytr = fashion_mnist("train", root=args.data)
    xte, yte = fashion_mnist("test", root=args.data)
    xtr, xte = to_unit_range(xtr), to_unit_range(xte)

    t0 = time.perf_counter()
    cdir = os.path.join(args.out, "classifier")
    if args.reuse_classifier and os.path.exists(os.path.join(cdir, "classifier.json")):
        cparams, meta = load_classifier(cdir)
        acc, c_secs = float(meta["test_accuracy"]), float(meta["seconds"])
    else:
        cparams = train_classifier(xtr, ytr, epochs=args.classifier_epochs, seed=args.seed)
        acc = float(np.mean(np.argmax(make_apply(cparams)(xte), -1) == yte))
        c_secs = time.perf_counter() - t0
        save_classifier(cparams, cdir, {"test_accuracy": acc, "epochs": args.classifier_epochs,
                                        "seed": args.seed, "seconds": round(c_secs, 1)})
    print(f"classifier: test accuracy {acc:.4f} ({c_secs:.0f} s)", flush=True)

    t0 = time.perf_counter()
    params, curve = train_dit(xtr[:, None], ytr, steps=args.steps, batch_size=args.batch_size,
                              seed=args.seed)
    d_secs = time.perf_counter() - t0
    save_dit_diffusers(FMNIST_DIT, params, os.path.join(args.out, "transformer"))
    os.makedirs(os.path.join(args.out, "scheduler"), exist_ok=True)
    with open(os.path.join(args.out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f, indent=1)
    log = {"classifier_test_accuracy": acc, "classifier_seconds": round(c_secs, 1),
           "dit_steps": args.steps, "dit_batch_size": args.batch_size, "dit_loss_per_100": curve,
           "dit_seconds": round(d_secs, 1), "seed": args.seed,
           "total_seconds": round(time.perf_counter() - t_all, 1)}
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(f"wrote {args.out} in {log['total_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
