"""OmniQuant's learnable weight clipping (LWC; Shao et al., 2024) as a pure function.

Every (row, group) of every linear of a block gets two clip logits (g_lo, g_hi); its quantization
range is [sigmoid(g_lo) * min, sigmoid(g_hi) * max] and rounding passes gradients straight through.
The logits are trained with AdamW to minimise the block's output error against full precision on
the calibration batches, all linears of the block jointly. Only the clipping is learned: OmniQuant's
learnable equivalent transformation (LET) is not implemented. The result is data, (lo, hi) factors
(out, G) per linear, that RTN then uses (``rtn(..., clip=(lo, hi))``) for the exported integers.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..quant.primitives import QuantArgs, grid_round, grid_value, group_view, qparams_from_range


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def lwc_fake_quant(W: torch.Tensor, args: QuantArgs, g_lo: torch.Tensor, g_hi: torch.Tensor,
                   scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Differentiable fake quantization of W (out, in) with learnable range factors, on moeq's one grid
    (:func:`moeq.quant.primitives.qparams_from_range`, scales rounded to ``scale_dtype`` as exported;
    roundings pass gradients straight through). -> W_hat (out, in)."""
    Wg = group_view(W, args)  # (out, G, gs)
    scale, zero = qparams_from_range(Wg.amin(-1) * torch.sigmoid(g_lo), Wg.amax(-1) * torch.sigmoid(g_hi), args,
                                     scale_dtype, _round_ste)  # (out, G) x2
    s, z = scale[..., None], zero[..., None]  # (out, G, 1)
    return grid_value(grid_round(Wg, s, z, args, _round_ste), s, z).reshape(W.shape)  # (out, in)


def learn_clipping(weights: dict[str, torch.Tensor], args_of: Callable[[str], QuantArgs], batches: list,
                   block_loss: Callable[[dict[str, torch.Tensor], object], torch.Tensor], epochs: int = 2,
                   lr: float = 5e-2, init: float = 4.0, scale_dtype: torch.dtype | None = None
                   ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """Train clip logits for ``weights`` ({name: W (out, in)}).

    ``block_loss(W_hat, batch)`` must return the (differentiable) output error of the block with
    the substituted weights on one calibration batch. -> ({name: (lo, hi) (out, G)}, {"loss_first", "loss_last"})."""
    logits = {}
    for n, W in weights.items():
        G = args_of(n).num_groups(W.shape[1])
        logits[n] = (torch.full((W.shape[0], G), init, requires_grad=True, device=W.device),
                     torch.full((W.shape[0], G), init, requires_grad=True, device=W.device))
    opt = torch.optim.AdamW([t for pair in logits.values() for t in pair], lr=lr, weight_decay=0.0)
    first = last = None
    with torch.enable_grad():
        for _ in range(epochs):
            tot = 0.0
            for b in batches:
                W_hat = {n: lwc_fake_quant(W.detach().float(), args_of(n), *logits[n], scale_dtype)
                         for n, W in weights.items()}
                loss = block_loss(W_hat, b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach())
            last = tot / max(1, len(batches))
            first = last if first is None else first
    clips = {n: (torch.sigmoid(lo).detach().cpu(), torch.sigmoid(hi).detach().cpu()) for n, (lo, hi) in logits.items()}
    return clips, {"loss_first_epoch": first, "loss_last_epoch": last}
