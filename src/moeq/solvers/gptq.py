"""GPTQ (Frantar et al., 2023) as a pure function, batched over equal-shaped linears.

Quantizes columns left to right and spreads each column's rounding error over the columns not yet
quantized, using the inverse Hessian H^-1 of the layer loss ||(W - W_hat) X||^2. The experts of one
MoE layer all have the same shape, so they are solved together: W is (B, out, in), H is (B, in, in),
and every step below (damping, Cholesky, the column loop, the lazy block updates) runs once for all
B experts instead of B times. A single linear is simply B = 1.

Knobs: relative damping (raised automatically, per matrix, when the Cholesky step fails), lazy block
updates of ``blocksize`` columns, act-order with static groups (scales fixed from the original
columns, so the exported groups stay consecutive and no g_idx is needed), group size, symmetric or
asymmetric grids, MSE clip search. Columns with zero Hessian diagonal are never wiped: their
diagonal is set to 1 so they are rounded without propagating error.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..quant.primitives import (QuantArgs, grid_round, grid_value, hessian_error, qparams_from_range, search_clip,
                                snap_grid)
from .base import QuantResult


def _grid(Wc: torch.Tensor, args: QuantArgs, scale_dtype, mse_clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (B, out) for the columns Wc (B, out, c) treated as one group per row."""
    B, out, c = Wc.shape
    flat = Wc.reshape(B * out, c)  # (B*out, c)
    one = args if args.superblock else replace(args, group_size=-1)  # the same grid on these columns as one group
    shrink = search_clip(flat, one, scale_dtype)[:, 0] if mse_clip else 1.0  # (B*out,)
    scale, zero = qparams_from_range(flat.amin(-1) * shrink, flat.amax(-1) * shrink, one, scale_dtype,
                                     snap=False)  # K-quant super-blocks: snapped with the whole row
    return scale.view(B, out), zero.view(B, out)


def _damped_cholesky_inverse(H: torch.Tensor, damp: float, max_damp: float = 1.0):
    """Upper Cholesky factor of (H + d*mean(diag H)*I)^-1 per matrix, raising d x10 where it fails.
    H (B, n, n) -> (Hinv (B, n, n), damp used (B,))."""
    B, n, _ = H.shape
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    mean_diag = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)  # (B,)
    d = torch.full((B,), float(damp), dtype=H.dtype, device=H.device)
    while True:
        Hd = H + (d * mean_diag)[:, None, None] * eye  # (B, n, n)
        L, info = torch.linalg.cholesky_ex(Hd)
        Linv_ok = info == 0
        if Linv_ok.all():
            Hinv = torch.cholesky_inverse(L)  # (B, n, n)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if (info2 == 0).all():
                return U, d
            Linv_ok = info2 == 0
        if (d[~Linv_ok] >= max_damp).any():
            raise RuntimeError(f"GPTQ: Hessian stays singular up to damping {max_damp}; use more calibration data")
        d = torch.where(Linv_ok, d, d * 10)


@torch.no_grad()
def gptaq_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """GPTAQ (Li et al., 2025): the weights whose outputs on the quantized inputs X~ best match the FP
    model's outputs W X. With H = X~ X~^T / n and C = (X - X~) X~^T / n,
    ||W X - Q X~||^2 = ||(W' - Q) X~||^2 + const for W' = W + W C H^-1, so GPTQ on (W', H) minimises the
    asymmetric objective. H is damped like GPTQ's. W (out, in), H and C (in, in) -> W' (out, in)."""
    n = H.shape[0]
    Hd = H.double() + damp * float(torch.diagonal(H).mean()) * torch.eye(n, dtype=torch.float64, device=H.device)
    WC = W.double() @ C.double()  # (out, in)
    return (W.double() + torch.linalg.solve(Hd, WC.T).T).float()  # Hd symmetric: (WC) Hd^-1 = (Hd^-1 (WC)^T)^T


@torch.no_grad()
def gptq(W: torch.Tensor, H: torch.Tensor, args: QuantArgs, *, blocksize: int = 128, damp: float = 0.01,
         act_order: bool = False, mse_clip: bool = False, scale_dtype: torch.dtype | None = None,
         positions: bool = False) -> list[QuantResult]:
    """Solve B linears at once. W (B, out, in) or (out, in); H (B, in, in) or (in, in), the mean of x x^T.

    Returns one QuantResult per linear; ``loss`` = tr((W - W_hat) H (W - W_hat)^T), the mean squared
    output error per calibration token (directly comparable with RTN's loss under the same H).
    ``positions``: keep each weight's grid position w / s + z at its rounding (after the error feedback of
    the columns before it) in ``QuantResult.pre``, the block tuner's start.
    """
    if W.dim() == 2:
        W, H = W[None], H[None]
    W = W.float().clone()  # (B, out, in)
    H = H.float().clone()  # (B, in, in)
    B, out, n = W.shape
    args.check_width(n)
    W0, H0 = W.clone(), H.clone()

    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0  # (B, in): columns no calibration token touched
    H.diagonal(dim1=-2, dim2=-1).masked_fill_(dead, 1.0)

    gs = n if args.group_size == -1 else args.group_size
    G = n // gs
    # static grid: per-channel scales, or with act-order (or a K-quant super-block grid, whose 16 scales are
    # snapped together) the scales of each group's original columns
    static_scale = static_zero = None
    if args.group_size == -1 or act_order or args.superblock:
        sz = [_grid(W[:, :, g * gs:(g + 1) * gs], args, scale_dtype, mse_clip) for g in range(G)]
        static_scale = torch.stack([s for s, _ in sz], -1)  # (B, out, G)
        static_zero = torch.stack([z for _, z in sz], -1)  # (B, out, G)
        if args.superblock:
            static_scale, static_zero = snap_grid(static_scale, static_zero, args)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True)  # (B, in)
        W = torch.gather(W, 2, perm[:, None, :].expand(B, out, n))
        H = torch.gather(torch.gather(H, 1, perm[:, :, None].expand(B, n, n)), 2, perm[:, None, :].expand(B, n, n))
    col_group = (perm if perm is not None else torch.arange(n).expand(B, n)) // gs  # (B, in) group of column

    Hinv, damp_used = _damped_cholesky_inverse(H, damp)  # (B, in, in) upper
    Q = torch.zeros_like(W)  # (B, out, in) dequantized result, permuted order
    Qint = torch.zeros_like(W)
    P = torch.zeros_like(W) if positions else None  # (B, out, in) positions before rounding
    scale = torch.zeros(B, out, G)
    zero = torch.zeros(B, out, G)
    if static_scale is not None:
        scale, zero = static_scale, static_zero
    bidx = torch.arange(B)

    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, :, i1:i2].clone()  # (B, out, c)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]  # (B, c, c)
        for i in range(i2 - i1):
            col = i1 + i
            if static_scale is None and col % gs == 0:  # dynamic groups: scales from the updated columns
                s, z = _grid(W1[:, :, i:i + gs] if i + gs <= i2 - i1 else
                             torch.cat([W1[:, :, i:], W[:, :, i2:col + gs]], -1), args, scale_dtype, mse_clip)
                scale[:, :, col // gs], zero[:, :, col // gs] = s, z
            g = col_group[:, col]  # (B,)
            s, z = scale[bidx, :, g], zero[bidx, :, g]  # (B, out)
            w = W1[:, :, i]  # (B, out)
            qi = grid_round(w, s, z, args)  # (B, out)
            q = grid_value(qi, s, z)  # (B, out)
            Qint[:, :, col], Q[:, :, col] = qi, q
            if P is not None:
                P[:, :, col] = w / s + z
            d = Hinv1[:, i, i]  # (B,)
            err = (w - q) / d[:, None]  # (B, out)
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, i, None, i:]  # (B, out, c-i)
            Err1[:, :, i] = err
        W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]  # lazy batch update (B, out, n-i2)

    if perm is not None:
        inv = torch.argsort(perm, dim=-1)  # (B, in)
        Qint = torch.gather(Qint, 2, inv[:, None, :].expand(B, out, n))
        Q = torch.gather(Q, 2, inv[:, None, :].expand(B, out, n))
        if P is not None:
            P = torch.gather(P, 2, inv[:, None, :].expand(B, out, n))

    losses = hessian_error(Q - W0, H0)  # (B,)
    return [
        QuantResult(Qint[b].to(torch.int8), scale[b].clone(), zero[b].clone(), args, None, float(losses[b]),
                    {"damp": float(damp_used[b]), "dead_columns": int(dead[b].sum())}, P[b] if P is not None else None)
        for b in range(B)
    ]
