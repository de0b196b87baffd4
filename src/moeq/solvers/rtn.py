"""Round-to-nearest: min-max (optionally MSE-clipped) scales, nearest integer. The data-free baseline."""

from __future__ import annotations

import torch

from ..quant.primitives import (QuantArgs, _expand, compute_qparams, group_view, hessian_error, qparams_from_range, quantize,
                                search_clip)
from .base import QuantResult


def rtn(W: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None,
        mse_clip: bool = False, H: torch.Tensor | None = None,
        clip: tuple[torch.Tensor, torch.Tensor] | None = None, positions: bool = False) -> QuantResult:
    """Quantize W (out, in) to the nearest grid point. With ``H`` (in, in), the loss reported is the
    GPTQ objective tr((W - W_hat) H (W - W_hat)^T), so RTN and GPTQ losses compare directly.
    ``clip`` = (lo, hi) factors (out, G) from a search (AWQ clip, OmniQuant LWC): each (row, group)
    range becomes [lo * min, hi * max]. ``positions``: keep w / s + z before rounding (``res.pre``)."""
    W = W.float()
    if clip is not None:
        Wg = group_view(W, args)  # (out, G, gs)
        scale, zero = qparams_from_range(Wg.amin(-1) * clip[0].to(W.device), Wg.amax(-1) * clip[1].to(W.device),
                                         args, scale_dtype)  # (out, G)
    else:
        shrink = search_clip(W, args, scale_dtype) if mse_clip else 1.0
        scale, zero = compute_qparams(W, args, scale_dtype, shrink)  # (out, G)
    q = quantize(W, scale, zero, args)  # (out, in)
    res = QuantResult(q, scale, zero, args)
    if positions:
        n = W.shape[1]
        res.pre = W / _expand(scale, args, n, None) + _expand(zero, args, n, None)  # (out, in)
    D = res.dequantize() - W  # (out, in)
    res.loss = float(hessian_error(D, H))
    return res
