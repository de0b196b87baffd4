"""Activation fake quantization for W*A* evaluation: per-token, symmetric, optionally clipped.

Each quantized linear's input x (..., d) is replaced by its fake-quantized value before the matmul:
scale = clip_ratio * max_j |x_j| / ((qmax - qmin) / 2) per token, q = clamp(round(x / scale), qmin, qmax),
x_hat = q * scale. This is compressed-tensors' dynamic per-token symmetric scheme (the same grid
convention as moeq's weights), so a checkpoint can describe it when clip_ratio is 1. Hooks are forward
pre-hooks: attach them after any online Hadamard hook of the same linear so the rotated input is
what gets quantized. Routers and lm_head keep full-precision inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .primitives import SignedGrid, grid_round, grid_value


@dataclass(frozen=True)
class ActQuantArgs(SignedGrid):
    num_bits: int = 4
    clip_ratio: float = 1.0  # per-token range multiplier (QuaRot uses 0.9 for W4A4)

    def __post_init__(self):
        if not isinstance(self.num_bits, int) or not 2 <= self.num_bits <= 8:
            raise ValueError(f"--act-bits must be an integer in 2..8, got {self.num_bits!r}")
        if not 0 < self.clip_ratio <= 1:
            raise ValueError(f"--act-clip must be in (0, 1], got {self.clip_ratio}")

    def label(self) -> str:
        return f"a{self.num_bits}" + ("" if self.clip_ratio == 1 else f"c{self.clip_ratio:g}")

    def to_dict(self) -> dict:
        return asdict(self)

    def compressed_tensors_args(self) -> dict | None:
        """QuantizationArgs fields for ``input_activations``; None when the scheme cannot be described
        (compressed-tensors has no clip-ratio field)."""
        if self.clip_ratio != 1:
            return None
        return {"num_bits": self.num_bits, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def fake_quant_tokens(x: torch.Tensor, args: ActQuantArgs) -> torch.Tensor:
    """Per-token symmetric fake quantization of x (..., d), computed in fp32, returned in x's dtype."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True) * args.clip_ratio  # (..., 1)
    scale = (amax / ((args.qmax - args.qmin) / 2)).clamp_min(1e-10)  # (..., 1)
    return grid_value(grid_round(xf, scale, None, args), scale, None).to(x.dtype)  # (..., d)


class ActQuant:
    """Forward pre-hook: the linear sees its input fake-quantized."""

    def __init__(self, args: ActQuantArgs):
        self.args = args

    def __call__(self, mod, inputs):
        return (fake_quant_tokens(inputs[0], self.args),) + tuple(inputs[1:])


def attach_act_quant(modules: dict[str, nn.Module], args: ActQuantArgs) -> list:
    """Register the hook on every module; -> handles (``h.remove()`` to detach)."""
    hook = ActQuant(args)
    return [m.register_forward_pre_hook(hook) for m in modules.values()]
