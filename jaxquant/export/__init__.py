"""Export a quantized model to what other runtimes load (``jaxquant export``).

Formats: ``compressed-tensors`` (pack-quantized: vLLM, transformers with the
``compressed-tensors`` package), ``gptq`` (AutoGPTQ / GPTQModel v1 layout: vLLM's GPTQ / Marlin
kernels, transformers with gptqmodel), ``orbax`` (jaxquant's native checkpoint). See
:mod:`jaxquant.export.formats` for the tensor layouts.
"""

from __future__ import annotations

import logging
import os

from jaxquant.export.decoder import UnsupportedExportError
from jaxquant.export.formats import export_compressed_tensors, export_gptq

FORMATS = ("compressed-tensors", "gptq", "orbax")
log = logging.getLogger(__name__)


def export(model, fmt: str, out: str | os.PathLike, *, dtype: str = "float16") -> str:
    """Write the quantized ``model`` (a path to a jaxquant quantized directory, or a loaded
    quantized decoder) to ``out`` in format ``fmt``; returns ``out``."""
    import jaxquant
    from jaxquant.models.common.config import DecoderConfig
    from jaxquant.models.quantized import save_quantized

    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: expected one of {FORMATS}")
    m = jaxquant.load(model) if isinstance(model, str | os.PathLike) else model
    if not isinstance(getattr(m, "config", None), DecoderConfig):
        raise UnsupportedExportError(
            f"{type(m).__name__}: only quantized decoders (Llama / Qwen2 / Qwen3) are exported "
            f"to {fmt}; a diffusion model stays in orbax (jaxquant quantize --out)")
    out = os.fspath(out)
    if fmt == "orbax":
        save_quantized(out, m.config, m.params, recipe={}, source=getattr(m, "path", None))
    elif fmt == "compressed-tensors":
        export_compressed_tensors(m.config, m.params, out, dtype=dtype)
    else:
        export_gptq(m.config, m.params, out, dtype=dtype)
    try:
        m.tokenizer.save_pretrained(out)  # a GGUF source's embedded tokenizer too
    except Exception as e:  # a tokenizer is a convenience, not the product
        log.warning("no tokenizer saved next to the export: %s", e)
    return out


__all__ = ["FORMATS", "UnsupportedExportError", "export", "export_compressed_tensors",
           "export_gptq"]
