"""AdaTSQ end to end on a class-conditional DiT: Fisher weights, the option models, the policy
search, and saving / loading the result (the algorithms are in
:mod:`jaxquant.algorithms.adatsq`).

An AdaTSQ recipe (``configs/recipes/adatsq_*.yaml``, ``kind: adatsq``)::

    name: adatsq_w4a4
    kind: adatsq
    budget: 4.0                      # average bits per step
    options:                         # one calibrated model per option (a DiT recipe each)
      - {name: w8a8, recipe: dit_gptq_w8a8, cost: 8}
      - {name: w4a4, recipe: dit_gptq_w4a4, cost: 4}
      - {name: w3a3, recipe: dit_gptq_w3a3, cost: 3}
    search: {beam_width: 4, rollout: budget, n_per_class: 2, seed: 7}
    fisher: {temperature: 1.0, n_per_step: 16}   # or false: plain (uniform) Hessians
    sampler: {steps: 25, guidance: 1.5}
    calibration: {n_per_class: 4, seed: 1}

``run_adatsq`` computes the temporal Fisher of the fp model (on its own samples from the search
noise), ``α_{t,l}``, calibrates every option with ``H' = Σ_t α_{t,l} H_t`` (GPTQ), then searches
the policy on fresh noise. ``save_adatsq`` writes ``options/<name>/`` (each a quantized DiT),
``policy.json`` and the Pareto-front plot; ``load_adatsq`` reads them back for sampling.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import numpy as np
import yaml

from jaxquant.algorithms.adatsq import SearchResult, fisher_weights

log = logging.getLogger(__name__)
POLICY_FILE = "policy.json"
_KEYS = {"name", "kind", "description", "budget", "options", "search", "fisher", "sampler",
         "calibration"}
_SEARCH = {"beam_width": 4, "rollout": "budget", "n_per_class": 2, "seed": 7}
_FISHER = {"temperature": 1.0, "n_per_step": 16, "seed": 0}
_SAMPLER = {"steps": 25, "guidance": 1.5}
_CALIB = {"n_per_class": 4, "seed": 1}


@dataclasses.dataclass(frozen=True)
class AdaTSQRecipe:
    name: str
    budget: float
    options: tuple[tuple[str, str, float], ...]  # (name, DiT recipe, cost in average bits)
    search: dict
    fisher: dict | None
    sampler: dict
    calibration: dict
    source: str = "<dict>"

    @property
    def names(self) -> list[str]:
        return [o[0] for o in self.options]

    @property
    def costs(self) -> list[float]:
        return [o[2] for o in self.options]

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": "adatsq", "budget": self.budget,
                "options": [{"name": n, "recipe": r, "cost": c} for n, r, c in self.options],
                "search": self.search, "fisher": self.fisher or False, "sampler": self.sampler,
                "calibration": self.calibration}


def is_adatsq(name_or_path) -> bool:
    d = _read(name_or_path)
    return isinstance(d, dict) and d.get("kind") == "adatsq"


def _read(name_or_path):
    if isinstance(name_or_path, dict):
        return name_or_path
    from jaxquant.recipes.recipe import RECIPE_DIR

    p = os.fspath(name_or_path)
    if not os.path.isfile(p):
        p = os.path.join(RECIPE_DIR, p if p.endswith(".yaml") else f"{p}.yaml")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return yaml.safe_load(f)


def load_adatsq_recipe(name_or_path) -> AdaTSQRecipe:
    """An AdaTSQ recipe, validated (errors name the file and the key)."""
    from jaxquant.recipes import RecipeError, load_recipe

    d = _read(name_or_path)
    src = name_or_path if isinstance(name_or_path, str) else "<dict>"
    if not isinstance(d, dict) or d.get("kind") != "adatsq":
        raise RecipeError(f"{src}: not an AdaTSQ recipe (needs 'kind: adatsq')")
    extra = sorted(set(d) - _KEYS)
    if extra:
        raise RecipeError(f"{src}: unknown key(s) {extra}; allowed: {sorted(_KEYS)}")
    opts = d.get("options") or []
    if len(opts) < 2:
        raise RecipeError(f"{src}: options must list at least two bit options, got {opts!r}")
    options = []
    for i, o in enumerate(opts):
        if not isinstance(o, dict) or set(o) != {"name", "recipe", "cost"}:
            raise RecipeError(f"{src}: options[{i}] must be {{name, recipe, cost}}, got {o!r}")
        try:
            load_recipe(o["recipe"])
        except (RecipeError, FileNotFoundError, KeyError) as e:
            raise RecipeError(f"{src}: options[{i}].recipe {o['recipe']!r}: {e}") from None
        if not isinstance(o["cost"], int | float) or o["cost"] <= 0:
            raise RecipeError(f"{src}: options[{i}].cost must be a positive number (average "
                              f"bits), got {o['cost']!r}")
        options.append((str(o["name"]), str(o["recipe"]), float(o["cost"])))
    costs = [o[2] for o in options]
    b = d.get("budget")
    if not isinstance(b, int | float) or not min(costs) <= b <= max(costs):
        raise RecipeError(f"{src}: budget must be an average bit-width in [{min(costs):g}, "
                          f"{max(costs):g}] (the options' costs), got {b!r}")

    def section(key, defaults):
        v = d.get(key, {})
        if v is False:
            return None
        if v is True or v is None:
            v = {}
        bad = sorted(set(v) - set(defaults))
        if bad:
            raise RecipeError(f"{src}: {key}: unknown key(s) {bad}; allowed: {sorted(defaults)}")
        return {**defaults, **v}

    search = section("search", _SEARCH)
    r = search["rollout"]
    if r not in ("fp", "budget") and r not in [o[0] for o in options]:
        raise RecipeError(f"{src}: search.rollout must be 'budget', 'fp' or an option name, got "
                          f"{r!r}")
    return AdaTSQRecipe(d.get("name", src), float(b), tuple(options), search,
                        section("fisher", _FISHER), section("sampler", _SAMPLER),
                        section("calibration", _CALIB), src)


@dataclasses.dataclass
class AdaTSQResult:
    recipe: AdaTSQRecipe
    option_params: list
    search: SearchResult
    alpha: dict | None  # {linear path: α [steps]}
    fisher: dict | None  # {linear path: I [steps]}
    seconds: dict  # fisher / calibration / search


def run_adatsq(m, rec: AdaTSQRecipe, schedule, *, calib: dict | None = None,
               progress: bool = True, option_params: list | None = None,
               out_dir: str | os.PathLike | None = None, resume: bool = False) -> AdaTSQResult:
    """Fisher weights, the option models (unless ``option_params`` are given), the search.

    With ``out_dir`` every option is saved to ``out_dir/options/<name>/`` as soon as it is
    calibrated; ``resume=True`` reloads the options already there instead of recalibrating them
    (an existing directory without ``resume`` is refused)."""
    import jax

    from jaxquant.calibration.engine import calibrate
    from jaxquant.diffusion.calibration import sample_dit, trajectory_batch
    from jaxquant.diffusion.fisher import temporal_fisher
    from jaxquant.diffusion.policy_search import search_policy
    from jaxquant.models.loading import adapter_for
    from jaxquant.recipes import load_recipe

    cfg = m.config
    steps, guidance = int(rec.sampler["steps"]), float(rec.sampler["guidance"])
    secs = {}
    sr = rec.search
    labels = np.repeat(np.arange(cfg.num_classes, dtype=np.int32), int(sr["n_per_class"]))
    x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(int(sr["seed"])),
                                       (len(labels), cfg.in_channels, cfg.sample_size,
                                        cfg.sample_size)))
    alpha = fisher = None
    if rec.fisher is not None and option_params is None:
        t0 = time.perf_counter()
        x0 = np.asarray(jax.jit(lambda: sample_dit(cfg, m.params, schedule, labels, steps=steps,
                                                   guidance=guidance, x_T=x_T))())
        fisher = temporal_fisher(cfg, m.params, schedule, x0, labels, steps=steps,
                                 n_per_step=int(rec.fisher["n_per_step"]),
                                 seed=int(rec.fisher["seed"]))
        paths = list(fisher)
        a = np.asarray(fisher_weights(np.stack([fisher[p] for p in paths]),
                                      temperature=float(rec.fisher["temperature"])))
        alpha = {p: a[i] for i, p in enumerate(paths)}
        secs["fisher"] = time.perf_counter() - t0
    if option_params is None:
        t0 = time.perf_counter()
        if calib is None:
            calib = trajectory_batch(cfg, m.params, schedule,
                                     n_per_class=int(rec.calibration["n_per_class"]), steps=steps,
                                     guidance=guidance, seed=int(rec.calibration["seed"]))
        option_params = []
        for name, rname, _ in rec.options:
            done = None if out_dir is None else os.path.join(os.fspath(out_dir), "options", name)
            if done is not None and os.path.isfile(os.path.join(done, "jaxquant.json")):
                if not resume:
                    raise FileExistsError(f"{done} holds a calibrated option of an earlier run; "
                                          "pass resume=True (--resume) to reuse it, or choose "
                                          "another output directory")
                from jaxquant.models.quantized import load_quantized

                option_params.append(load_quantized(done)[1])
                log.info("AdaTSQ option %s: reloaded from %s", name, done)
                continue
            r = load_recipe(rname)
            n = len(calib["latents"])
            if int(r.calib["n_samples"]) > n:  # the option recipe asks for more: use them all
                r = r.with_calib(n_samples=n)
            res = calibrate(adapter_for(m), r, calib, progress=progress, group_weights=alpha)
            option_params.append(res.params)
            if done is not None:  # saved at once: an interrupted run resumes from here
                from jaxquant.models.quantized import save_quantized

                save_quantized(done, cfg, res.params, recipe=r.to_dict(), source=m.path)
            if progress:
                print(f"AdaTSQ option {name} ({rname}) calibrated", flush=True)
        secs["calibration"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rollout = sr["rollout"] if sr["rollout"] in ("fp", "budget") \
        else rec.names.index(sr["rollout"])
    result = search_policy(cfg, option_params, rec.costs, rec.budget, m.params, schedule,
                           labels, x_T, steps=steps, guidance=guidance,
                           beam_width=sr["beam_width"], rollout=rollout, names=rec.names,
                           progress=progress)
    secs["search"] = time.perf_counter() - t0
    return AdaTSQResult(rec, option_params, result, alpha, fisher, secs)


def save_adatsq(out: str | os.PathLike, m, res: AdaTSQResult, *, scheduler_file=None) -> None:
    """``out/options/<name>/`` (quantized DiTs), ``out/policy.json``, ``out/pareto.png``."""
    import shutil

    from jaxquant.diffusion.policy_search import plot_front
    from jaxquant.models.quantized import save_quantized

    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    rec = res.recipe
    for (name, rname, _), params in zip(rec.options, res.option_params, strict=True):
        from jaxquant.recipes import load_recipe

        if os.path.isfile(os.path.join(out, "options", name, "jaxquant.json")):
            continue  # saved by run_adatsq as it was calibrated
        save_quantized(os.path.join(out, "options", name), m.config, params,
                       recipe=load_recipe(rname).to_dict(), source=m.path)
    s = res.search
    policy = {"recipe": rec.to_dict(), "options": rec.names, "costs": rec.costs,
              "policy": [rec.names[k] for k in s.policy], "avg_bits": s.avg_bits,
              "search_error": s.error, "steps": int(rec.sampler["steps"]),
              "front": [{"avg_bits": b, "error": e, "policy": [rec.names[k] for k in p]}
                        for b, e, p in s.front],
              "evaluated": s.evaluated, "seconds": res.seconds, "source": m.path}
    with open(os.path.join(out, POLICY_FILE), "w") as f:
        json.dump(policy, f, indent=1)
    if scheduler_file is not None:
        os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
        shutil.copy(scheduler_file, os.path.join(out, "scheduler", "scheduler_config.json"))
    plot_front(s, os.path.join(out, "pareto.png"), budget=rec.budget, names=rec.names,
               costs=rec.costs)


def load_adatsq(path: str | os.PathLike) -> tuple[Any, list, list[int], dict]:
    """``(config, option params, policy as option indices, policy.json)`` of a saved result;
    an option named by the policy without its calibrated weights is refused by name."""
    from jaxquant.models.quantized import load_quantized

    path = os.fspath(path)
    with open(os.path.join(path, POLICY_FILE)) as f:
        meta = json.load(f)
    names = meta["options"]
    params, cfg = [], None
    for name in names:
        d = os.path.join(path, "options", name)
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{path}: the policy uses option {name!r}, but "
                                    f"options/{name}/ (its calibrated weights) is missing")
        cfg, p, _ = load_quantized(d)
        params.append(p)
    bad = [p for p in meta["policy"] if p not in names]
    if bad:
        raise ValueError(f"{path}/{POLICY_FILE}: policy names unknown option(s) {bad}")
    return cfg, params, [names.index(p) for p in meta["policy"]], meta
