"""A small Fashion-MNIST classifier: the judge of class-conditional DiT samples.

Its logits give the accuracy of samples drawn for a class; its penultimate features (128-d) give the
Fréchet distance between a sample set and the real test images (an FID analogue for 28×28 images:
no Inception network can be downloaded here, and Inception features mean little on Fashion-MNIST).

Images are float ``[N, 28, 28]`` (or ``[N, 1, 28, 28]``) in ``[-1, 1]``: the DiT's pixel range.
Weights are saved as safetensors (flattened parameter paths) plus a JSON with the test accuracy.
"""

from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

N_CLASSES = 10
FEATURES = 128


class FMNISTClassifier(nn.Module):
    """conv(32) → pool → conv(64) → pool → dense(128) [features] → dense(10) [logits]."""

    @nn.compact
    def __call__(self, x: jax.Array, *, features: bool = False) -> jax.Array:
        """``x`` ``[N, 28, 28]`` or ``[N, 1, 28, 28]`` in [-1, 1] → logits ``[N, 10]`` (or the
        penultimate features ``[N, 128]``)."""
        if x.ndim == 4:
            x = x[:, 0]
        h = x[..., None].astype(jnp.float32)
        h = nn.relu(nn.Conv(32, (3, 3))(h))
        h = nn.max_pool(h, (2, 2), (2, 2))
        h = nn.relu(nn.Conv(64, (3, 3))(h))
        h = nn.max_pool(h, (2, 2), (2, 2))
        h = nn.relu(nn.Dense(FEATURES)(h.reshape(h.shape[0], -1)))
        return h if features else nn.Dense(N_CLASSES)(h)


def to_unit_range(images_u8: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` → float32 in [-1, 1]."""
    return (np.asarray(images_u8, np.float32) / 127.5 - 1.0).astype(np.float32)


def train_classifier(train_x: np.ndarray, train_y: np.ndarray, *, epochs: int = 3,
                     batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                     log=print) -> dict:
    """Train with Adam on ``train_x`` ``[N, 28, 28]`` (float, [-1, 1]) and ``train_y`` ``[N]``;
    returns the params."""
    import optax

    model = FMNISTClassifier()
    key = jax.random.PRNGKey(seed)
    params = model.init(key, jnp.zeros((1, 28, 28), jnp.float32))["params"]
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    rng = np.random.default_rng(seed)
    n = len(train_x) // batch_size * batch_size
    t0 = time.perf_counter()
    for ep in range(epochs):
        perm = rng.permutation(len(train_x))[:n].reshape(-1, batch_size)
        for idx in perm:
            params, state, loss = step(params, state, jnp.asarray(train_x[idx]),
                                       jnp.asarray(train_y[idx].astype(np.int32)))
        log(f"classifier epoch {ep + 1}/{epochs}: loss {float(loss):.3f} "
            f"({time.perf_counter() - t0:.0f} s)")
    return params


def make_apply(params, *, features: bool = False, batch_size: int = 500):
    """A numpy-in, numpy-out batched function: images → logits (or features)."""
    model = FMNISTClassifier()
    f = jax.jit(lambda x: model.apply({"params": params}, x, features=features))

    def run(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        out = [np.asarray(f(jnp.asarray(x[i:i + batch_size])))
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out, 0)

    return run


def save_classifier(params, out_dir: str, meta: dict) -> None:
    """Write ``classifier.safetensors`` (flattened paths) and ``classifier.json``."""
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
    save_file(flat, os.path.join(out_dir, "classifier.safetensors"))
    with open(os.path.join(out_dir, "classifier.json"), "w") as f:
        json.dump(meta, f, indent=1)


def load_classifier(out_dir: str):
    """Read what :func:`save_classifier` wrote; returns ``(params, meta)``."""
    from flax.traverse_util import unflatten_dict
    from safetensors.numpy import load_file

    path = os.path.join(out_dir, "classifier.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no classifier here; train one with "
                                "`python -m jaxquant.diffusion.train_fmnist`")
    flat = load_file(path)
    params = unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
    with open(os.path.join(out_dir, "classifier.json")) as f:
        meta = json.load(f)
    return params, meta
