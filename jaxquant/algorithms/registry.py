"""The algorithm registry: every quantization method the calibration engine can run, by name.

An :class:`Algorithm` states

* ``needs``: the statistics of a linear's input it reads (the engine computes only those, and runs
  no forward pass at all when no rule of a recipe needs data):

  ========== ==================================================================================
  ``H``      ``Σ_t w_t x_t x_tᵀ`` ``[K, K]`` (``w_t`` the per-sample weight, 1 by default)
  ``tokens`` a strided subsample of the inputs ``[T', K]`` (AWQ's scale and clip searches)
  ``cross``  ``Σ_t w_t (x_t^fp − x_t) x_tᵀ`` ``[K, K]`` against the fp reference stream (GPTAQ)
  ``H_groups`` ``[G, K, K]``: ``H`` kept per group of samples (per timestep group)
  ========== ==================================================================================

  plus ``sum``/``count``/``max``/``min``, always there;
* ``options``: its option schema (defaults; the type of each default is the type accepted;
  ``choices`` restricts string options; ``check`` adds constraints). It is the recipe validation;
* ``quantize(W, stats, spec, **options) -> (QArray, extras)``, a pure function of one weight
  matrix ``W`` ``[K, N]``. ``extras["producer_scale"]`` ``[K]`` asks the engine to fold a
  per-input-channel scale into the linear that produces the input (DSQ's ``s^c``);
* optionally ``input_scale(X, Ws, spec, **options) -> s`` ``[K]``: a scale searched for all the
  linears that share one input (AWQ), which the engine folds into the input's producer;
  ``fold_target`` names the producer role it needs (``"gated_mlp"``);
* ``batchable``: linears that share an input and a rule may be quantized as one matrix (their
  columns concatenated), e.g. GPTQ on q/k/v.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jaxquant.core.spec import QuantSpec

STATISTICS = ("H", "tokens", "cross", "H_groups")


class OptionError(ValueError):
    """An algorithm option outside the algorithm's schema (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    quantize: Callable[..., tuple[Any, dict]]
    needs: frozenset[str] = frozenset()
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    check: Callable[[dict, QuantSpec], None] | None = None
    input_scale: Callable[..., Any] | None = None
    token_budget: Callable[[dict], int] | None = None
    producer_fold: bool = False
    fold_target: str = ""  # the producer role a producer_fold algorithm needs
    batchable: bool = False
    doc: str = ""

    def __post_init__(self):
        bad = set(self.needs) - set(STATISTICS)
        if bad:
            raise ValueError(f"algorithm {self.name!r}: unknown statistics {sorted(bad)}; "
                             f"known: {STATISTICS}")

    def resolve(self, options: Mapping[str, Any] | None, spec: QuantSpec | None,
                where: str = "") -> dict:
        """The full options (defaults filled in), validated against the schema."""
        where = where or f"algorithm {self.name!r}"
        options = dict(options or {})
        extra = sorted(set(options) - set(self.options))
        if extra:
            raise OptionError(f"{where}.options: unknown option(s) {extra} for algorithm "
                              f"{self.name!r}; allowed: {sorted(self.options)}")
        out = {**self.options, **options}
        for k, v in options.items():
            d = self.options[k]
            ok = (isinstance(v, bool) if isinstance(d, bool) else
                  isinstance(v, int | float) and not isinstance(v, bool) if isinstance(d, float)
                  else isinstance(v, int) and not isinstance(v, bool) if isinstance(d, int)
                  else isinstance(v, type(d)) if d is not None else True)
            if not ok:
                raise OptionError(f"{where}.options.{k}: must be a {type(d).__name__}, got "
                                  f"{v!r}")
            if k in self.choices and v not in self.choices[k]:
                raise OptionError(f"{where}.options.{k}: must be one of {self.choices[k]}, got "
                                  f"{v!r}")
        if self.check is not None:
            try:
                self.check(out, spec)
            except ValueError as e:
                raise OptionError(f"{where}: {e}") from None
        return out


_REGISTRY: dict[str, Algorithm] = {}


def register(algo: Algorithm) -> Algorithm:
    if algo.name in _REGISTRY:
        raise ValueError(f"algorithm {algo.name!r} is already registered")
    _REGISTRY[algo.name] = algo
    return algo


def get(name: str) -> Algorithm:
    if name not in _REGISTRY:
        raise KeyError(f"unknown algorithm {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))
