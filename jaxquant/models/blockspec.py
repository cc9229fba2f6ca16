"""Block specs: what a model family tells the calibration engine about one of its layer blocks.

The engine (:mod:`jaxquant.calibration.engine`) names no family, no linear and no tensor: it
reads everything from a :class:`BlockSpec` and a :class:`ModelAdapter`.

A layer block is cut into *stages* in true-sequential order. Stage ``k`` has a pure function
``fn(params, state, batch) -> state`` that runs the block from the end of stage ``k-1`` up to the
input of stage ``k``'s linears (using the linears of stage ``k-1``, already quantized when the
engine calls it), and names the ``state`` key that holds that input. ``finish(params, state,
batch) -> state`` applies the last stage's linears and returns the block output under ``"x"``.
For Llama::

    state {"x"}            --fn[attn_in]-->  {"x", "h" = input_norm(x)}            q, k, v read h
                           --fn[attn_out]--> {"x", "ctx" = attention(q, k, v)}      o reads ctx
                           --fn[mlp_in]-->   {"x" = x + o(ctx), "h" = post_norm(x)} gate, up read h
                           --fn[mlp_out]-->  {"x", "a" = silu(gate h) * up h}        down reads a
                           --finish-->       {"x" = x + down(a)}

Every state entry has a leading sample axis ``[n, ...]``; ``batch`` holds the per-sample fields of
the same samples (token positions, timesteps, conditioning, masks, sample weights).

A stage may declare the *producer* of its input: the norm or the linear(s) whose output channel
``j`` the input's channel ``j`` is proportional to. Folds use it: an AWQ scale ``s`` divides the
producer's output channels (and multiplies the stage's weight rows), DSQ's per-channel scale
multiplies them, and a DAC bias is added to a norm producer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, Protocol

StageFn = Callable[[Any, dict, dict], dict]


@dataclasses.dataclass(frozen=True)
class Producer:
    """What produces a stage's input, channel by channel: a ``norm`` (path of its params, with
    ``scale`` and optional ``bias``), ``linear`` paths (kernel ``[in, out]``, optional bias), or an
    adaLN ``modulation`` (the linear at ``paths[0]`` whose output chunks are the shift and scale).
    """

    kind: Literal["norm", "linear", "modulation"]
    paths: tuple[str, ...]
    role: str = ""  # e.g. "gated_mlp": the up-projection of a gated MLP (DSQ folds into it)
    # kind "modulation" (adaLN: h = LN(x) ⊙ (1 + scale) + shift, with shift and scale chunks of
    # one linear's output): (number of chunks, shift chunk, scale chunk)
    chunks: tuple[int, int, int] = ()


@dataclasses.dataclass(frozen=True)
class Stage:
    """One true-sequential stage: ``linears`` all read ``state[input]`` after ``fn``."""

    name: str
    linears: tuple[str, ...]
    input: str
    fn: StageFn
    producer: Producer | None = None


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """A family's layer block as data: stages in true-sequential order, the finishing function,
    the block's linears and the batch fields its functions read."""

    stages: tuple[Stage, ...]
    finish: StageFn
    linears: tuple[str, ...]
    batch_fields: tuple[str, ...] = ()
    stream: str = "x"  # the state key that carries the block input and output
    # linears whose output is added to the stream (a residual rotation right-multiplies them);
    # the stream's readers are the linears of the stages whose producer is a norm of the stream
    residual_writers: tuple[str, ...] = ()

    def __post_init__(self):
        seen: dict[str, str] = {}
        for st in self.stages:
            for lin in st.linears:
                if lin in seen:
                    raise ValueError(f"block spec: linear {lin!r} is in stages {seen[lin]!r} and "
                                     f"{st.name!r}; each linear belongs to one stage")
                if lin not in self.linears:
                    raise ValueError(f"block spec: stage {st.name!r} names linear {lin!r}, which "
                                     f"the block does not have (linears: {list(self.linears)})")
                seen[lin] = st.name
        missing = [lin for lin in self.linears if lin not in seen]
        if missing:
            raise ValueError(f"block spec: the stages do not cover the linears {missing}; every "
                             "linear must be quantized in exactly one stage")

    def stage_of(self, linear: str) -> Stage:
        for st in self.stages:
            if linear in st.linears:
                return st
        raise KeyError(linear)

    def stage_with_producer(self, path: str) -> Stage | None:
        """The stage whose input is produced by the norm or linear at ``path``."""
        for st in self.stages:
            if st.producer is not None and path in st.producer.paths:
                return st
        return None


def get_path(tree: dict, path: str):
    """The entry of a nested dict at a block path ``a/b/c``."""
    for k in path.split("/"):
        tree = tree[k]
    return tree


def set_path(tree: dict, path: str, value) -> dict:
    """Functional update of a nested dict at ``a/b/c``."""
    k, _, rest = path.partition("/")
    out = dict(tree)
    out[k] = set_path(tree[k], rest, value) if rest else value
    return out


class ModelAdapter(Protocol):
    """Model-level plumbing the engine needs from a family, over a checkpoint or params in memory.

    Block parameters use the family's Flax layout (kernels ``[in, out]``)."""

    spec: BlockSpec
    num_blocks: int

    def check(self) -> None:
        """Raise a clear error now if a tensor the run needs at its end is missing."""

    def read_block(self, b: int) -> dict:
        """The fp parameters of layer block ``b`` (float32 numpy/jax arrays)."""

    def make_batch(self, calib: Any) -> dict:
        """Validated per-sample batch fields ``{name: [n, ...]}`` from the calibration data."""

    def first_input(self, batch: dict) -> Any:
        """The first block's input stream ``[n, ...]`` (e.g. token embeddings)."""

    def assemble(self, blocks: list) -> Any:
        """The model's parameters: the unquantized top-level tensors plus ``blocks``."""

    def fingerprint(self) -> str:
        """A short hash identifying the model (refuses resuming another model's run)."""
