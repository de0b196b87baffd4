"""Round-to-nearest: min-max (optionally MSE-clipped) scales, nearest integer. The data-free baseline."""

from __future__ import annotations

import torch

from ..quant.primitives import QuantArgs, compute_qparams, quantize, search_clip
from .base import QuantResult


def rtn(W: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None,
        mse_clip: bool = False, H: torch.Tensor | None = None) -> QuantResult:
    """Quantize W (out, in) to the nearest grid point. With ``H`` (in, in), the loss reported is the
    GPTQ objective tr((W - W_hat) H (W - W_hat)^T), so RTN and GPTQ losses compare directly."""
    W = W.float()
    shrink = search_clip(W, args, scale_dtype) if mse_clip else 1.0
    scale, zero = compute_qparams(W, args, scale_dtype, shrink)  # (out, G)
    q = quantize(W, scale, zero, args)  # (out, in)
    res = QuantResult(q, scale, zero, args)
    D = res.dequantize() - W  # (out, in)
    res.loss = float(((D @ H) * D).sum()) if H is not None else float(D.pow(2).sum())
    return res
