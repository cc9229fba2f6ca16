"""jaxquant: post-training quantization of large models, natively in JAX.

The front door re-exports the common path explicitly; everything else lives in its subpackage
(``jaxquant.core``, ``jaxquant.models``, ``jaxquant.eval``, ...).
"""

from jaxquant.api import evaluate, load, quantize_model
from jaxquant.core import QArray, QuantSpec, dequantize, fake_quant, quantize

__version__ = "0.1.0"

__all__ = ["QArray", "QuantSpec", "__version__", "dequantize", "evaluate", "fake_quant", "load",
           "quantize", "quantize_model"]
