"""The front door: three calls for the common path.

::

    import jaxquant as jq
    model = jq.load("smollm2-135m")                        # HF dir, .gguf, quantized dir, or alias
    qmodel = jq.quantize_model(model, "gptq_w4_g64", "wikitext2", out="out/w4")
    print(jq.evaluate(qmodel, data="wikitext2", windows=64))   # {"ppl": ..., "tokens": ...}

Everything underneath (the calibration engine, the recipes, the eval loops) stays reachable from
its own module for research use.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from jaxquant.models.loading import LoadedModel

log = logging.getLogger(__name__)


def load(path: str | os.PathLike, **kw) -> LoadedModel:
    """Load a model: an HF safetensors directory, a ``.gguf`` file, a jaxquant quantized
    directory, or a bundled alias (``"smollm2-135m"``). The result is callable:
    ``model(tokens) -> logits``."""
    from jaxquant.models.assets import resolve_model_path
    from jaxquant.models.loading import load as _load_path

    return _load_path(resolve_model_path(os.fspath(path)), **kw)


def _calib_data(calib: Any, tokenizer, recipe) -> Any:
    """Token windows from ``"wikitext2"`` / a ``.npy`` path, or ``calib`` itself."""
    from jaxquant import data as jdata

    c = recipe.calib
    if isinstance(calib, str | os.PathLike):
        s = os.fspath(calib)
        if s == "wikitext2":
            return jdata.calib_windows(tokenizer(), int(c["n_samples"]), int(c["seqlen"]),
                                       seed=int(c["seed"]))
        if s.endswith(".npy"):
            if not os.path.isfile(s):
                raise FileNotFoundError(f"calib: file not found: {s}")
            arr = np.load(s, allow_pickle=False)
            return arr if arr.ndim == 2 else jdata.windows_from_tokens(
                arr, int(c["n_samples"]), int(c["seqlen"]))
        raise ValueError(f"calib: expected 'wikitext2', a .npy file of token ids, an array or a "
                         f"dict of batch fields; got {s!r}")
    return calib


def quantize_model(model: LoadedModel | str | os.PathLike, recipe, calib: Any = "wikitext2",
                   out: str | os.PathLike | None = None, *, resume: bool = False, mesh=None,
                   model_axis: str | None = None, progress: bool = True,
                   offload: bool = False, act_budget: int | None = None,
                   disk_budget: int | None = None) -> LoadedModel:
    """Quantize ``model`` with ``recipe`` and return the quantized model (callable).

    Args:
      model: a path (the checkpoint is streamed one block at a time, so a model larger than
        memory calibrates) or a :class:`LoadedModel` in memory.
      recipe: a shipped recipe name (``"gptq_w4_g64"``), a YAML path or a dict.
      calib: ``"wikitext2"`` (the protocol's calibration windows), a ``.npy`` of token ids, an
        array ``[n, T]``, a dict of batch fields, or None for a data-free recipe.
      out: save the quantized model (safetensors + ``jaxquant.json``), its tokenizer and the
        reports (``layers.csv``, ``layers.png``, ``blocks.csv``) there; progress is checkpointed
        after every block, and ``resume=True`` continues an interrupted run.
      mesh, model_axis: shard the calibration samples over ``mesh``'s ``"data"`` axis and each
        weight's output columns over ``model_axis`` while it is quantized. Under
        ``jax.distributed`` the mesh spans every host: all processes call this with the same
        arguments, each holds its share of the activations, and ``out`` must be a directory
        they all see (process 0 writes the single-copy files).
      offload: for a model larger than memory (needs ``out``): no quantized block is held in
        memory, each goes to ``out`` as it finishes and the saved model is assembled on disk;
        the returned model then has no params in memory (``jaxquant.load(out)`` reads it).
      act_budget, disk_budget: bytes; see :func:`jaxquant.calibration.engine.calibrate`.

    The returned model's ``calibration`` attribute holds the engine's
    :class:`~jaxquant.calibration.engine.CalibrationResult` (per-layer errors, per-block phases).
    """
    from jaxquant.calibration import distributed as D
    from jaxquant.calibration import report
    from jaxquant.calibration.engine import calibrate, clear_progress
    from jaxquant.models.assets import resolve_model_path
    from jaxquant.models.loading import adapter_for
    from jaxquant.models.quantized import save_quantized, save_quantized_blocks
    from jaxquant.recipes import Recipe, load_recipe

    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if offload and out is None:
        raise ValueError("offload=True needs out: the quantized blocks are written there")
    if (offload or act_budget is not None) and (_is_llada(model) or _as_dit(model) is not None):
        raise ValueError("offload / act_budget: supported for decoder LLMs (Llama, Qwen); "
                         "LLaDA and diffusion transformers calibrate in memory")
    if _is_llada(model):
        return _quantize_llada(model, rec, calib, out, resume=resume, mesh=mesh,
                               progress=progress)
    dit_model = _as_dit(model)
    if dit_model is not None:
        return _quantize_dit(dit_model, rec, calib, out, resume=resume, mesh=mesh,
                             progress=progress)
    if isinstance(model, LoadedModel):
        src_path = model.path
        tok_cache = [model.tokenizer] if "tokenizer" in model.__dict__ else []
    else:
        src_path = resolve_model_path(os.fspath(model))
        tok_cache = []

    def tokenizer():
        if not tok_cache:
            from jaxquant.models.loading import load_tokenizer

            tok_cache.append(load_tokenizer(src_path))
        return tok_cache[0]

    adapter = adapter_for(model if isinstance(model, LoadedModel) else src_path)
    data = _calib_data(calib, tokenizer, rec) if rec.needs_data else None
    res = calibrate(adapter, rec, data, out_dir=out, resume=resume, mesh=mesh,
                    model_axis=model_axis, progress=progress, offload=offload,
                    act_budget=act_budget, disk_budget=disk_budget)
    qm = LoadedModel(res.config, res.params, os.fspath(out) if out else src_path, "jaxquant",
                     calibration=res)
    if out is not None:
        t0 = time.perf_counter()
        if offload:
            save_quantized_blocks(out, res.config, res.top_parts, res.block_dirs, res.blocks_key,
                                  recipe=rec.to_dict(), source=src_path)
        else:
            save_quantized(out, res.config, res.params, recipe=rec.to_dict(), source=src_path)
        if D.is_writer():  # one copy of the single-copy files in a multi-process job
            try:
                tokenizer().save_pretrained(out)
            except Exception as e:  # a tokenizer is a convenience for eval/generate
                log.warning("could not save the tokenizer next to the model: %s", e)
            report.write_csv(res.report, os.path.join(out, "layers.csv"))
            report.write_phases_csv(res.blocks, os.path.join(out, "blocks.csv"))
            if res.report:
                report.plot(res.report, os.path.join(out, "layers.png"), title=rec.name)
        D.barrier("jaxquant-saved")
        if D.is_writer():
            clear_progress(out)
        log.info("saved %s in %.1f s", out, time.perf_counter() - t0)
    return qm


def evaluate(model: LoadedModel | str | os.PathLike, data: Any = "wikitext2", windows: int = 64,
             *, seqlen: int = 512, batch_size: int = 1, mesh=None, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``data``: ``"wikitext2"`` (the protocol's test windows), a
    ``.npy`` of token ids, or token windows ``[n, T]``. Returns ``{"ppl", "nll", "tokens",
    "windows", "seconds"}``."""
    from jaxquant import data as jdata
    from jaxquant import eval as jeval

    t0 = time.perf_counter()
    m = model if isinstance(model, LoadedModel) else load(model)
    if isinstance(data, str | os.PathLike):
        s = os.fspath(data)
        if s == "wikitext2":
            w = jdata.eval_windows(m.tokenizer, windows or None, seqlen)
        elif s.endswith(".npy"):
            arr = np.load(s, allow_pickle=False)
            w = jdata.windows_from_tokens(arr, windows or None, seqlen) if arr.ndim == 1 \
                else (arr[:windows] if windows else arr)
        else:
            raise ValueError(f"data: expected 'wikitext2', a .npy file of token ids or an array "
                             f"[n, T]; got {s!r}")
    else:
        w = np.asarray(data)
        if w.ndim != 2:
            raise ValueError(f"data: token windows must be [n, T], got shape {w.shape}")
        w = w[:windows] if windows else w
    r = jeval.perplexity(jeval.model_logits_fn(m.config, m.params), w, batch_size=batch_size,
                         vocab_size=m.config.vocab_size, mesh=mesh, progress=progress)
    return {**r, "windows": int(w.shape[0]), "seqlen": int(w.shape[1]),
            "seconds": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------ diffusion LLMs (LLaDA)
def _is_llada(model) -> bool:
    from jaxquant.models import llada

    if isinstance(model, llada.LLaDAModel):
        return True
    return isinstance(model, str | os.PathLike) and llada.is_llada_dir(model)


def _quantize_llada(m, rec, calib, out, *, resume, mesh, progress):
    """:func:`quantize_model` for a LLaDA masked-diffusion LM: ``calib`` is a dict of batch
    fields (e.g. :func:`jaxquant.models.llada.spec.masked_calibration_batch`: windows masked at
    several mask ratios) or token ids ``[n, T]``; ``out`` gets the quantized params and
    ``jaxquant.json`` (and the tokenizer files of the source)."""
    import shutil

    from jaxquant.calibration import report
    from jaxquant.calibration.engine import calibrate, clear_progress
    from jaxquant.models import llada
    from jaxquant.models.loading import adapter_for
    from jaxquant.models.quantized import save_quantized

    if not isinstance(m, llada.LLaDAModel):
        m = llada.load_llada(m)
    if isinstance(calib, str):
        raise ValueError(f"calib={calib!r}: a LLaDA model calibrates on masked token windows; "
                         "pass masked_calibration_batch(windows, mask_ratios, mask_id=...) or "
                         "token ids [n, T]")
    data = calib if rec.needs_data else None
    res = calibrate(adapter_for(m), rec, data, out_dir=out, resume=resume, mesh=mesh,
                    progress=progress)
    qm = llada.LLaDAModel(m.config, res.params, os.fspath(out) if out else m.path)
    qm.calibration = res
    if out is not None:
        save_quantized(out, m.config, res.params, recipe=rec.to_dict(), source=m.path)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if m.path and os.path.isfile(os.path.join(m.path, name)):
                shutil.copy(os.path.join(m.path, name), os.path.join(out, name))
        report.write_csv(res.report, os.path.join(out, "layers.csv"))
        if res.report:
            report.plot(res.report, os.path.join(out, "layers.png"), title=rec.name)
        clear_progress(out)
    return qm


# ------------------------------------------------------------------ diffusion transformers
def _as_dit(model):
    """The loaded DiT when ``model`` is one (or a diffusers directory holding one), else None."""
    from jaxquant.models import dit

    if isinstance(model, dit.DiffusionTransformer):
        return model
    if isinstance(model, str | os.PathLike):
        p = os.fspath(model)
        for d in (p, os.path.join(p, "transformer")):
            cfg = os.path.join(d, "config.json")
            if os.path.isfile(cfg):
                import json

                with open(cfg) as f:
                    if "_class_name" in json.load(f):
                        return dit.load_diffusers(p)
    return None


def _quantize_dit(m, rec, calib, out, *, resume, mesh, progress):
    """:func:`quantize_model` for a class-conditional DiT: ``calib`` is ``"trajectories"`` (the
    default: model inputs along fp DDIM trajectories with the pipeline's scheduler) or a dict of
    batch fields; ``out`` gets the quantized params, ``jaxquant.json`` and the scheduler config."""
    import json
    import shutil

    from jaxquant.calibration.engine import calibrate, clear_progress
    from jaxquant.eval.dit import find_scheduler
    from jaxquant.models.dit.transformer import DiffusionTransformer
    from jaxquant.models.loading import adapter_for
    from jaxquant.models.quantized import save_quantized

    sched_file = find_scheduler(m.path)
    if isinstance(calib, str) and calib in ("wikitext2", "trajectories"):
        if sched_file is None:
            raise FileNotFoundError(f"{m.path}: calibrating a DiT on its own trajectories needs "
                                    "scheduler/scheduler_config.json beside the transformer; "
                                    "or pass calib as a dict of batch fields")
        from jaxquant.diffusion.calibration import trajectory_batch
        from jaxquant.diffusion.schedules import NoiseSchedule

        with open(sched_file) as f:
            sched = NoiseSchedule.from_config(json.load(f), ignore_unknown=True)
        n = int(rec.calib["n_samples"])
        steps = 25
        per_class = max(1, -(-n // (2 * steps * m.config.num_classes)))
        calib = trajectory_batch(m.config, m.params, sched, n_per_class=per_class, steps=steps,
                                 seed=int(rec.calib["seed"]))
    data = calib if rec.needs_data else None
    res = calibrate(adapter_for(m), rec, data, out_dir=out, resume=resume, mesh=mesh,
                    progress=progress)
    qm = DiffusionTransformer(m.config, res.params, os.fspath(out) if out else m.path)
    qm.calibration = res
    if out is not None:
        save_quantized(out, m.config, res.params, recipe=rec.to_dict(), source=m.path)
        if sched_file is not None:
            os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
            shutil.copy(sched_file, os.path.join(out, "scheduler", "scheduler_config.json"))
        clear_progress(out)
    return qm
