"""Recipes as data: ``configs/recipes/*.yaml`` -> :class:`Recipe`.

A recipe is an ordered list of rules. Each rule has a regex ``pattern`` that must *fully* match a
linear's parameter path (``layers/3/self_attn/q_proj``, ``layers/12/mlp/down_proj``...), an
``algorithm`` (``rtn``, ``gptq``, ``awq``, or ``none`` to keep the layer in floating point), a
``spec`` (the :class:`~jaxquant.QuantSpec` fields) and algorithm ``options``. The first matching
rule wins. Layers that no rule matches stay in floating point and are reported, and so are rules
that match nothing. Every key is documented in ``configs/recipes/README.md``; unknown keys are
errors, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any

import yaml

from jaxquant import algorithms  # noqa: F401  (registers the algorithms)
from jaxquant.algorithms import registry
from jaxquant.core.spec import QuantSpec

KEEP_FP = "none"  # the algorithm name that keeps a layer in floating point
_RULE_KEYS = {"pattern", "algorithm", "spec", "options", "activations", "transform"}
# a rule's orthogonal input transform x -> x G, G = P H_block (CLQ's OBS; jaxquant.core.orthogonal):
# block: the Hadamard order; permute: the outlier-aware channel permutation P (else P = I);
# statistic: the outlier score; deal: how ranked channels are dealt to blocks; pad: zero-pad a
# width the block does not divide; seed: the Hadamard's random signs
_TRANSFORM_KEYS = {"block": 64, "permute": True, "statistic": "absmax_median",
                   "deal": "round_robin", "pad": False, "seed": 0}
# a rule's activation quantizer (jaxquant.nn.linear.ActQuant): dynamic per token, symmetric
_ACT_KEYS = {"bits": 8, "clip_ratio": 1.0, "mode": "int", "rotate": 0}
_RECIPE_KEYS = {"name", "description", "rules", "calibration", "reference", "dac", "rotation",
                "smooth", "clps"}
# CLQ's cross-layer parameter search (jaxquant.algorithms.clq) on every stage whose linears
# quantize their activations: weight (grid_w) x activation (grid_a) clip ratios, scored at the
# downstream point chosen by `downstream` (max | first | last) with `cost` (rel | mse), on
# n_samples calibration samples (strided)
_CLPS_KEYS = {"grid_w": (1.0, 0.95, 0.9, 0.85, 0.8), "grid_a": (1.0, 0.95, 0.9, 0.85, 0.8),
              "downstream": "max", "cost": "rel", "n_samples": 128}
# SmoothQuant on every stage whose linears all quantize their activations (migration strength α)
_SMOOTH_KEYS = {"alpha": 0.5}
# a residual rotation folded into the fp weights before calibration (jaxquant.models.rotation)
_ROTATION_KEYS = {"kind": "block_hadamard", "block": 64, "seed": 0}
# the fp reference stream a recipe may ask for (one more forward per block): the fp model's own
# activations ("fp_prefix") or the fp block on the quantized stream's block input ("same_input")
REFERENCES = ("fp_prefix", "same_input")
# D²Quant's deviation-aware correction (a bias in RMSNorms)
# clip: |μ| is clipped to this (D²Quant's public code: λ = 1, clipped to ±10); null: no clip
# final: also correct the model's last norm, the teacher a stream with the quantized attention
# (and its DAC) but fp MLPs, carried through every block (D²Quant's public code)
_DAC_KEYS = {"norms": ("post_attention_layernorm",), "reference": "same_input", "clip": 10.0,
             "final": False}
DAC_REFERENCES = REFERENCES
# inputs: "quantized" (each block calibrated on its quantized prefix's outputs, weights and
# activations quantized: CLQ's cross-block calibration, the default) or "fp" (the fp model's)
_CALIB_KEYS = {"n_samples": 32, "seqlen": 512, "batch_size": 4, "seed": 0, "inputs": "quantized"}
CALIB_INPUTS = ("quantized", "fp")
_SPEC_KEYS = {f.name for f in dataclasses.fields(QuantSpec)}
# configs/recipes, through the package's link to it (so a wheel carries the recipes too)
RECIPE_DIR = os.path.join(os.path.dirname(__file__), "shipped")


class RecipeError(ValueError):
    """A malformed recipe (the message names the file, rule and key)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    algorithm: str
    spec: QuantSpec | None
    options: tuple[tuple[str, Any], ...] = ()
    activations: tuple[tuple[str, Any], ...] | None = None  # None: activations stay float
    transform: tuple[tuple[str, Any], ...] | None = None  # None: no input transform

    @property
    def obs(self) -> dict | None:
        """The rule's input transform settings (see ``_TRANSFORM_KEYS``), or None."""
        return None if self.transform is None else {**_TRANSFORM_KEYS, **dict(self.transform)}

    @property
    def act(self):
        """The :class:`~jaxquant.nn.linear.ActQuant` of this rule's linears, or None."""
        if self.activations is None:
            return None
        from jaxquant.nn.linear import ActQuant

        return ActQuant(**{**_ACT_KEYS, **dict(self.activations)})

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None

    @property
    def opts(self) -> dict:
        """The rule's options with the algorithm's defaults filled in."""
        if self.algorithm == KEEP_FP:
            return {}
        return registry.get(self.algorithm).resolve(dict(self.options), self.spec,
                                                    f"rule {self.pattern!r}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]
    calibration: tuple[tuple[str, Any], ...] = ()
    description: str = ""
    source: str = "<dict>"
    reference_stream: str | None = None
    dac_options: tuple[tuple[str, Any], ...] | None = None  # None: no DAC
    rotation_options: tuple[tuple[str, Any], ...] | None = None  # None: no rotation
    smooth_options: tuple[tuple[str, Any], ...] | None = None  # None: no SmoothQuant
    clps_options: tuple[tuple[str, Any], ...] | None = None  # None: no parameter search

    @property
    def clps(self) -> dict | None:
        """CLQ's cross-layer parameter search settings, or None."""
        if self.clps_options is None:
            return None
        return {**_CLPS_KEYS, **dict(self.clps_options)}

    @property
    def smooth(self) -> dict | None:
        """SmoothQuant settings (``alpha``) or None."""
        if self.smooth_options is None:
            return None
        return {**_SMOOTH_KEYS, **dict(self.smooth_options)}

    @property
    def rotation(self) -> dict | None:
        """Rotation settings (``kind``, ``block``, ``seed``) or None."""
        if self.rotation_options is None:
            return None
        return {**_ROTATION_KEYS, **dict(self.rotation_options)}

    @property
    def dac(self) -> dict | None:
        """DAC settings (``norms``, ``reference``) or None when the recipe has no DAC."""
        if self.dac_options is None:
            return None
        return {**_DAC_KEYS, **dict(self.dac_options)}

    @property
    def dac_teacher(self) -> bool:
        """DAC's teacher is the fp block on the quantized stream's block input while the carried
        reference is the fp model's stream: one more partial forward, up to the last DAC norm."""
        d = self.dac
        return d is not None and d["reference"] == "same_input" and self.reference == "fp_prefix"

    @property
    def reference(self) -> str | None:
        """The fp reference stream the calibration carries (None: none, no extra forward)."""
        if self.reference_stream is not None:
            return self.reference_stream
        return self.dac["reference"] if self.dac else None

    def match(self, path: str) -> Rule | None:
        """The first rule whose pattern fully matches ``path`` (None: keep fp)."""
        for r in self.rules:
            if r.matches(path):
                return r
        return None

    @property
    def calib(self) -> dict:
        return {**_CALIB_KEYS, **dict(self.calibration)}

    def report(self, paths: list[str]) -> tuple[list[str], list[str]]:
        """``(unmatched layer paths, patterns of rules no layer uses)``: a rule is unused when it
        matches no path, or only paths an earlier rule already took."""
        chosen = [self.match(p) for p in paths]
        unmatched = [p for p, r in zip(paths, chosen, strict=True) if r is None]
        used = {id(r) for r in chosen if r is not None}
        unused = [r.pattern for r in self.rules if id(r) not in used]
        return unmatched, unused

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "rules": [
                {"pattern": r.pattern, "algorithm": r.algorithm,
                 "spec": None if r.spec is None else dataclasses.asdict(r.spec),
                 "options": dict(r.options),
                 **({} if r.activations is None else {"activations": dict(r.activations)}),
                **({} if r.transform is None else {"transform": dict(r.transform)})}
                for r in self.rules
            ],
            "calibration": dict(self.calibration),
            "reference": self.reference_stream,
            "dac": None if self.dac_options is None else
            {k: list(v) if isinstance(v, tuple) else v for k, v in self.dac_options},
            **({} if self.rotation_options is None else {"rotation": self.rotation}),
            **({} if self.smooth_options is None else {"smooth": self.smooth}),
            **({} if self.clps_options is None else {"clps": self.clps}),
        }

    def with_calib(self, **kw) -> Recipe:
        """A copy with calibration settings replaced (e.g. a command line's ``--n-samples``)."""
        _unknown(kw, _CALIB_KEYS, f"{self.source}: calibration")
        return dataclasses.replace(self, calibration=tuple({**dict(self.calibration),
                                                            **kw}.items()))

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def needs_data(self) -> bool:
        return self.reference is not None or self.smooth is not None \
            or self.clps_options is not None or any(
            r.transform is not None and r.obs["permute"] for r in self.rules) or any(
            r.algorithm != KEEP_FP and registry.get(r.algorithm).needs for r in self.rules)


def _section(d: dict, key: str, allowed, source: str) -> dict | None:
    """An optional mapping section (``true`` = all defaults; absent or ``false`` = None)."""
    v = d.get(key)
    if v is None or v is False:
        return None
    if v is True:
        return {}
    if not isinstance(v, dict):
        raise RecipeError(f"{source}: {key} must be a mapping (or true), got {v!r}")
    _unknown(v, allowed, f"{source}: {key}")
    return v


def _unknown(keys, allowed, where: str) -> None:
    extra = sorted(set(keys) - set(allowed))
    if extra:
        raise RecipeError(f"{where}: unknown key(s) {extra}; allowed: {sorted(allowed)}")


def recipe_from_dict(d: dict, *, source: str = "<dict>") -> Recipe:
    if not isinstance(d, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping, got {type(d).__name__}")
    if d.get("kind") == "adatsq":
        raise RecipeError(f"{source}: an AdaTSQ recipe (kind: adatsq: option models plus a "
                          "per-step policy search), not a single-model recipe; load it with "
                          "jaxquant.diffusion.adatsq.load_adatsq_recipe or run it with "
                          "'jaxquant quantize --recipe ...'")
    if "sequential" in d:
        raise RecipeError(f"{source}: 'sequential' is gone: every recipe is calibrated "
                          "true-sequentially (each stage of a block sees the quantized earlier "
                          "stages); remove the key")
    _unknown(d, _RECIPE_KEYS, source)
    if not d.get("rules"):
        raise RecipeError(f"{source}: 'rules' must be a non-empty list")
    rules = []
    for i, r in enumerate(d["rules"]):
        where = f"{source}: rules[{i}]"
        if not isinstance(r, dict):
            raise RecipeError(f"{where}: must be a mapping")
        _unknown(r, _RULE_KEYS, where)
        if "pattern" not in r or "algorithm" not in r:
            raise RecipeError(f"{where}: needs 'pattern' and 'algorithm'")
        try:
            re.compile(r["pattern"])
        except re.error as e:
            raise RecipeError(f"{where}: pattern {r['pattern']!r} is not a regex ({e})") from None
        algo = r["algorithm"]
        if algo != KEEP_FP and algo not in registry.names():
            raise RecipeError(
                f"{where}: unknown algorithm {algo!r}; known: {[KEEP_FP, *registry.names()]}"
            )
        opts = r.get("options") or {}
        if not isinstance(opts, dict):
            raise RecipeError(f"{where}.options: must be a mapping, got {opts!r}")
        spec = None
        if algo != "none":
            s = r.get("spec") or {}
            _unknown(s, _SPEC_KEYS, f"{where}.spec")
            try:
                spec = QuantSpec(**s)
            except ValueError as e:
                raise RecipeError(f"{where}.spec: {e}") from None
        if algo != KEEP_FP:
            try:
                registry.get(algo).resolve(opts, spec, where)
            except registry.OptionError as e:
                raise RecipeError(str(e)) from None
        acts = r.get("activations")
        if acts is not None:
            if algo == KEEP_FP:
                raise RecipeError(f"{where}.activations: a rule that keeps the layer fp "
                                  "('none') quantizes no activations; remove the key")
            if not isinstance(acts, dict):
                raise RecipeError(f"{where}.activations: must be a mapping, got {acts!r}")
            _unknown(acts, set(_ACT_KEYS), f"{where}.activations")
            from jaxquant.nn.linear import ActQuant

            try:
                ActQuant(**{**_ACT_KEYS, **acts})
            except (TypeError, ValueError) as e:
                raise RecipeError(f"{where}.activations: {e}") from None
            if acts.get("mode", "int") == "int" and spec is not None and (
                    not spec.symmetric or spec.bits not in (4, 8)):
                raise RecipeError(f"{where}.activations: mode 'int' multiplies integer codes and "
                                  f"needs a symmetric 4- or 8-bit weight spec, got bits="
                                  f"{spec.bits} symmetric={spec.symmetric}; use mode 'fake'")
            acts = tuple(sorted(acts.items()))
        tr = r.get("transform")
        if tr is not None:
            tr = _check_transform(tr, acts, where)
        rules.append(Rule(r["pattern"], algo, spec, tuple(sorted(opts.items())), acts, tr))
    calib = d.get("calibration") or {}
    _unknown(calib, _CALIB_KEYS, f"{source}: calibration")
    if calib.get("inputs", "quantized") not in CALIB_INPUTS:
        raise RecipeError(f"{source}: calibration.inputs must be one of {CALIB_INPUTS}, got "
                          f"{calib['inputs']!r}")
    clps = _section(d, "clps", _CLPS_KEYS, source)
    clps_opts = None
    if clps is not None:
        clps_opts = _check_clps(clps, rules, source)
    dac = _section(d, "dac", _DAC_KEYS, source)
    dac_opts = None
    if dac is not None:
        dac = {**_DAC_KEYS, **dac}
        norms = dac["norms"]
        if isinstance(norms, str):
            norms = [norms]
        if not norms or not all(isinstance(n, str) for n in norms):
            raise RecipeError(f"{source}: dac.norms must be a non-empty list of norm names (the "
                              f"family's block spec checks them), got {dac['norms']!r}")
        if dac["reference"] not in DAC_REFERENCES:
            raise RecipeError(f"{source}: dac.reference must be one of {DAC_REFERENCES}, "
                              f"got {dac['reference']!r}")
        clip = dac["clip"]
        if clip is not None and (not isinstance(clip, int | float) or clip <= 0):
            raise RecipeError(f"{source}: dac.clip must be a positive number or null, got "
                              f"{clip!r}")
        if not isinstance(dac["final"], bool):
            raise RecipeError(f"{source}: dac.final must be true or false, got {dac['final']!r}")
        dac_opts = (("norms", tuple(norms)),
                    ("reference", dac["reference"]),
                    ("clip", None if clip is None else float(clip)),
                    ("final", dac["final"]))
    ref = d.get("reference")
    if ref is not None and ref not in REFERENCES:
        raise RecipeError(f"{source}: reference must be one of {REFERENCES} (or absent), got "
                          f"{ref!r}")
    if (ref == "same_input" and dac_opts is not None
            and dict(dac_opts)["reference"] == "fp_prefix"):
        raise RecipeError(f"{source}: dac.reference 'fp_prefix' needs the fp model's stream, but "
                          "the recipe carries reference 'same_input'")
    rot = _section(d, "rotation", _ROTATION_KEYS, source)
    rot_opts = None
    if rot is not None:
        from jaxquant.models.rotation import RotationSpec  # validates kind and block

        try:
            RotationSpec(**{**_ROTATION_KEYS, **rot})
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{source}: {e}") from None
        rot_opts = tuple(sorted(rot.items()))
    sm = _section(d, "smooth", _SMOOTH_KEYS, source)
    sm_opts = None
    if sm is not None:
        a = sm.get("alpha", _SMOOTH_KEYS["alpha"])
        if not isinstance(a, int | float) or not 0.0 <= a <= 1.0:
            raise RecipeError(f"{source}: smooth.alpha must be a number in [0, 1], got {a!r}")
        if not any(r.activations is not None for r in rules):
            raise RecipeError(f"{source}: 'smooth' migrates activation outliers into weights, but "
                              "no rule quantizes activations (add an 'activations' key)")
        sm_opts = tuple(sorted(sm.items()))
    for i, r in enumerate(rules):
        reads_ref = r.algorithm != KEEP_FP and "cross" in registry.get(r.algorithm).needs
        if reads_ref and (ref or (dict(dac_opts)["reference"] if dac_opts else None)) is None:
            raise RecipeError(
                f"{source}: rules[{i}] ({r.pattern!r}) runs {r.algorithm}, which reads the cross "
                "term against the fp reference stream, but the recipe carries none; add "
                "'reference: fp_prefix' (the fp model's own activations)")
    return Recipe(d.get("name", os.path.basename(source)), tuple(rules),
                  tuple(sorted(calib.items())), d.get("description", ""), source,
                  ref, dac_opts, rot_opts, sm_opts, clps_opts)


def _check_transform(tr, acts, where: str) -> tuple:
    from jaxquant.core.hadamard import hadamard_orders_supported
    from jaxquant.core.orthogonal import DEALS, OUTLIER_STATISTICS

    if not isinstance(tr, dict):
        raise RecipeError(f"{where}.transform: must be a mapping, got {tr!r}")
    _unknown(tr, _TRANSFORM_KEYS, f"{where}.transform")
    t = {**_TRANSFORM_KEYS, **tr}
    b = t["block"]
    if not isinstance(b, int) or isinstance(b, bool) or b < 1 or not hadamard_orders_supported(b):
        raise RecipeError(f"{where}.transform.block: must be a Hadamard order jaxquant can build "
                          f"(1, 2 or a multiple of 4 from Sylvester/Paley factors), got {b!r}")
    for k in ("permute", "pad"):
        if not isinstance(t[k], bool):
            raise RecipeError(f"{where}.transform.{k}: must be true or false, got {t[k]!r}")
    if t["statistic"] not in OUTLIER_STATISTICS:
        raise RecipeError(f"{where}.transform.statistic: must be one of {OUTLIER_STATISTICS}, got "
                          f"{t['statistic']!r}")
    if t["deal"] not in DEALS:
        raise RecipeError(f"{where}.transform.deal: must be one of {DEALS}, got {t['deal']!r}")
    if acts is None:
        raise RecipeError(f"{where}.transform: an input transform smooths activations for their "
                          "quantizer, but the rule quantizes none (add 'activations')")
    if dict(acts).get("rotate", 0):
        raise RecipeError(f"{where}.transform: the rule already rotates its input "
                          "(activations.rotate); use one of the two")
    return tuple(sorted(tr.items()))


def _check_clps(clps: dict, rules, source: str) -> tuple:
    c = {**_CLPS_KEYS, **clps}
    for k in ("grid_w", "grid_a"):
        g = c[k]
        if not isinstance(g, list | tuple) or not g or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and 0.0 < v <= 1.0
                for v in g):
            raise RecipeError(f"{source}: clps.{k} must be a non-empty list of ratios in (0, 1], "
                              f"got {g!r}")
        c[k] = tuple(float(v) for v in g)
    from jaxquant.algorithms.clq import COSTS, DOWNSTREAM

    if c["downstream"] not in DOWNSTREAM:
        raise RecipeError(f"{source}: clps.downstream must be one of {DOWNSTREAM}, got "
                          f"{c['downstream']!r}")
    if c["cost"] not in COSTS:
        raise RecipeError(f"{source}: clps.cost must be one of {COSTS}, got {c['cost']!r}")
    if not isinstance(c["n_samples"], int) or c["n_samples"] < 1:
        raise RecipeError(f"{source}: clps.n_samples must be a positive integer, got "
                          f"{c['n_samples']!r}")
    if not any(r.activations is not None for r in rules):
        raise RecipeError(f"{source}: 'clps' searches weight and activation clip ratios, but no "
                          "rule quantizes activations (add an 'activations' key)")
    return tuple(sorted(c.items()))


def load_recipe(name_or_path: str | os.PathLike | dict) -> Recipe:
    """A recipe from a dict, a YAML file, or the name of one in ``configs/recipes``."""
    if isinstance(name_or_path, dict):
        return recipe_from_dict(name_or_path)
    p = os.fspath(name_or_path)
    if not os.path.isfile(p):
        cand = os.path.join(RECIPE_DIR, p if p.endswith(".yaml") else f"{p}.yaml")
        if not os.path.isfile(cand):
            known = sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml")) \
                if os.path.isdir(RECIPE_DIR) else []
            raise FileNotFoundError(f"recipe {p!r} not found (a YAML path, or one of {known})")
        p = cand
    with open(p) as f:
        try:
            d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise RecipeError(f"{p}: not valid YAML ({e})") from None
    return recipe_from_dict(d, source=p)
