"""moeq: MoE-aware post-training quantization with measured costs.

Public API::

    from moeq import quantize, QuantConfig, QuantArgs, BitPlan, evaluate_ppl, load_model, ModelAdapter

The package reads as the data flow: models (registry, per-expert view) -> calib (text, windows) ->
capture (the block loop, statistics) -> solvers (RTN, GPTQ) -> export (compressed-tensors) ->
evaluate (perplexity, reports). ``moeq.pipeline`` strings them together; ``moeq.cli`` is the CLI.
"""

__version__ = "0.1.0"

from .config import BitPlan, CalibSpec, GPTQKnobs, QuantConfig  # noqa: E402
from .quant.primitives import QuantArgs  # noqa: E402


def __getattr__(name):  # heavy imports (transformers) only when used
    if name == "quantize":
        from .pipeline import quantize
        return quantize
    if name == "evaluate_ppl":
        from .evaluate.perplexity import evaluate_ppl
        return evaluate_ppl
    if name == "load_model":
        from .models.loading import load_model
        return load_model
    if name == "ModelAdapter":
        from .models.adapter import ModelAdapter
        return ModelAdapter
    raise AttributeError(name)


__all__ = ["BitPlan", "CalibSpec", "GPTQKnobs", "ModelAdapter", "QuantArgs", "QuantConfig", "evaluate_ppl",
           "load_model", "quantize"]
