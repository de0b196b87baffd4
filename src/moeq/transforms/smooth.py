"""Apply AWQ scales: divide a previous op's output channels by s, multiply its readers' inputs by s.

For a norm (weight w) feeding linears W_j:      w <- w / s,      W_j <- W_j diag(s)
For a linear (W_p, b_p) feeding a linear W_n:   W_p <- diag(1/s) W_p, b_p <- b_p / s,   W_n <- W_n diag(s)

Both are exact in full precision (s > 0), so the model computes the same function; the point is that
quantizing W diag(s) loses less on the channels that carry large activations. A norm's readers all
see the same (scaled) output, so one scale serves all of them; readers that stay in full precision
(the router, a shared-expert gate) are compensated the same way, so routing does not change.
The scales themselves are searched by :mod:`moeq.solvers.awq` and recorded as :class:`SmoothScale`
data, which :func:`apply_smooth` replays on a fresh model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.adapter import get_submodule


@dataclass
class SmoothScale:
    """One searched scale: block index, the op whose output is divided, the modules whose input is multiplied."""

    block: int
    prev: str  # block-relative path of a norm or a linear
    consumers: tuple[str, ...]  # block-relative paths (quantized readers and full-precision compensations)
    scale: torch.Tensor  # (d,) > 0
    info: dict | None = None  # search facts (alpha, losses)


def _set(t: torch.Tensor, new: torch.Tensor) -> None:
    t.data = new.to(dtype=t.dtype, device=t.device)


@torch.no_grad()
def apply_smooth(block: nn.Module, prev: str, consumers, scale: torch.Tensor) -> None:
    """Rewrite ``block`` in place so that prev's output is divided by ``scale`` and consumers compensate."""
    s = scale.to(torch.float64)  # (d,)
    op = get_submodule(block, prev)
    if isinstance(op, nn.Linear):
        _set(op.weight, op.weight.data.to(torch.float64) / s[:, None])  # (d, in) rows
        if op.bias is not None:
            _set(op.bias, op.bias.data.to(torch.float64) / s)
    else:  # a norm with an elementwise weight
        _set(op.weight, op.weight.data.to(torch.float64) / s)
    for c in consumers:
        W = get_submodule(block, c).weight
        _set(W, W.data.to(torch.float64) * s[None, :])  # (out, d) columns


def apply_scales(blocks, scales: list[SmoothScale]) -> None:
    """Replay recorded scales (e.g. loaded from a transforms artefact) on ``blocks`` (an nn.ModuleList)."""
    for sc in scales:
        apply_smooth(blocks[sc.block], sc.prev, sc.consumers, sc.scale)
