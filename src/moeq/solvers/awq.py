"""AWQ (Lin et al., 2024) searches as pure functions: activation-aware scales and output-aware clipping.

Scale search, for one (previous op -> readers) pair: with x_bar the per-channel mean |x| of the
readers' input, try s = x_bar^alpha (alpha = 0, 1/grid, ..., normalised so that max(s) min(s) = 1),
quantize every reader as Q(W diag(s)) diag(s)^-1 and keep the alpha whose output (of the module the
caller inspects, e.g. the whole attention or MoE block) is closest to the full-precision output.
Clip search, per linear: shrink each (row, group) range by p in {1, 1 - 1/grid, ..., 1 - max_shrink}
and keep the p minimising that row's output error on sampled inputs.

Affinity weighting (MoEQuant+, MoEQuant Eq. 18 applied to AWQ): every row may carry a weight c (its
routing coefficient); the statistic becomes sum_i c_i |x_i| / sum_i c_i and every loss sums c_i times
the row's squared error. With c = None both reduce to plain AWQ.

Both searches return data (scales, clip factors) and never touch a model; the caller applies them.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..quant.primitives import QuantArgs, fake_quantize, grid_round, grid_value, group_view, qparams_from_range
from ..quant.primitives import hessian_error as _hessian_error


def channel_mean(rows: list[torch.Tensor], weights: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """sum_i c_i |x_i| / sum_i c_i over all rows (c = 1 when weights are None). -> (d,) fp32."""
    num, den = 0.0, 0.0
    for k, x in enumerate(rows):
        x = x.reshape(-1, x.shape[-1]).float().abs()  # (r, d)
        c = weights[k] if weights is not None else None
        if c is None:
            num, den = num + x.sum(0), den + x.shape[0]
        else:
            c = c.float().reshape(-1, 1)  # (r, 1)
            num, den = num + (x * c).sum(0), den + float(c.sum())
    return num / max(den, 1e-12)


def weighted_sq_error(y_hat: torch.Tensor, y: torch.Tensor, c: torch.Tensor | None = None) -> tuple[float, float]:
    """(sum of c_i ||y_hat_i - y_i||^2, sum of c_i) over rows; c = 1 when None."""
    d = (y_hat.float() - y.float()).reshape(-1, y.shape[-1]).pow(2).sum(-1)  # (r,)
    if c is None:
        return float(d.sum()), float(d.numel())
    c = c.float().reshape(-1)
    return float((d * c).sum()), float(c.sum())


@torch.no_grad()
def search_scale(x_mean: torch.Tensor, weights: dict[str, torch.Tensor], args_of: Callable[[str], QuantArgs | None],
                 loss_fn: Callable[[dict[str, torch.Tensor]], float], grid: int = 20,
                 scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    """Best scale s (d,) for readers ``weights`` ({name: W (out, d)}) of a channel statistic x_mean (d,).

    ``loss_fn({name: W_hat})`` returns the inspected output's error with those weights substituted.
    Readers whose ``args_of(name)`` is None stay unquantized. -> (s, {"alpha", "loss", "loss_alpha0"})."""
    x_mean = x_mean.float()
    best, best_s, best_a, first = float("inf"), None, 0.0, None
    for k in range(grid):
        alpha = k / grid
        s = x_mean.pow(alpha).clamp_min(1e-4)  # (d,)
        s = s / (s.max() * s.min()).sqrt()
        W_hat = {}
        for name, W in weights.items():
            args = args_of(name)
            Ws = W.float() * s[None, :]  # (out, d)
            W_hat[name] = (fake_quantize(Ws, args, scale_dtype) if args is not None else Ws) / s[None, :]
        loss = float(loss_fn(W_hat))
        first = loss if first is None else first
        if loss < best:
            best, best_s, best_a = loss, s.clone(), alpha
    return best_s, {"alpha": best_a, "loss": best, "loss_alpha0": first}


def row_hessian(X: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """H = sum_i c_i x_i x_i^T / sum_i c_i (d, d): sum_i c_i ||x_i D^T||^2 = tr(D H D^T) * sum c for any D."""
    X = X.float()  # (n, d)
    if c is None:
        return X.T @ X / max(1, X.shape[0])
    Xc = X * c.float().clamp_min(0).sqrt()[:, None]  # rows scaled by sqrt(c)
    return Xc.T @ Xc / max(float(c.sum()), 1e-12)


def hessian_error(D: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H D^T) for a weight error D (out, d) as a float (the loss closures sum floats): the mean
    (weighted) squared output error per row. See :func:`moeq.quant.primitives.hessian_error`."""
    return float(_hessian_error(D, H))


def _clipped_fake_quant(Wg: torch.Tensor, xmin, xmax, p: float, args: QuantArgs, scale_dtype) -> torch.Tensor:
    """Fake-quantize grouped W (out, G, gs) with each (row, group) range shrunk by p."""
    s, z = (t[..., None] for t in qparams_from_range(xmin * p, xmax * p, args, scale_dtype))  # (out, G, 1)
    return grid_value(grid_round(Wg, s, z, args), s, z)  # (out, G, gs)


@torch.no_grad()
def search_clip(W: torch.Tensor, X: torch.Tensor, args: QuantArgs, c: torch.Tensor | None = None, grid: int = 20,
                max_shrink: float = 0.5, scale_dtype: torch.dtype | None = None,
                oc_batch: int = 256) -> torch.Tensor:
    """Per (row, group) shrink p (out, G) of the min-max range minimising the group's output error
    sum_n c_n (x_n . (w - q(w)))^2 on the rows X (n, in). p = 1 everywhere when X has no rows."""
    Wg = group_view(W.float(), args)  # (out, G, gs)
    out, G, gs = Wg.shape
    best_p = torch.ones(out, G)
    if X.shape[0] == 0:
        return best_p
    Xg = X.float().reshape(X.shape[0], G, gs)  # (n, G, gs)
    cw = None if c is None else c.float().reshape(-1, 1, 1)  # (n, 1, 1)
    for o0 in range(0, out, oc_batch):
        w = Wg[o0:o0 + oc_batch]  # (o, G, gs)
        ref = torch.einsum("ngk,ogk->nog", Xg, w)  # (n, o, G)
        xmin, xmax = w.amin(-1), w.amax(-1)  # (o, G)
        best = torch.full(xmin.shape, float("inf"))
        for k in range(int(max_shrink * grid)):
            p = 1 - k / grid
            err = (torch.einsum("ngk,ogk->nog", Xg, _clipped_fake_quant(w, xmin, xmax, p, args, scale_dtype)) - ref).pow(2)
            err = (err * cw).sum(0) if cw is not None else err.sum(0)  # (o, G)
            better = err < best
            best = torch.where(better, err, best)
            best_p[o0:o0 + oc_batch] = torch.where(better, torch.full_like(err, p), best_p[o0:o0 + oc_batch])
    return best_p
