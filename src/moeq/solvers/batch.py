"""Turn one group's statistics into solver calls, batched over equal shapes, and split the results.

Linears that share an input (q/k/v; an expert's gate and up) share a Hessian and are solved as one
row-stacked matrix. Tasks of equal shape and quantization arguments (the same projection of every
expert of a layer) are solved in one batched GPTQ call. Experts that saw fewer than ``min_tokens``
routed calibration tokens get the documented fallback: RTN, or GPTQ with the average Hessian of
the layer's other experts of the same input width; the decision is recorded per module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import QuantConfig
from ..quant.primitives import QuantArgs
from .base import QuantResult
from .gptq import gptq
from .rtn import rtn


@dataclass
class Task:
    names: list[str]  # row-stacked members, in order
    W: torch.Tensor  # (sum out, in)
    H: torch.Tensor | None  # (in, in) mean Hessian, None when no statistics
    args: QuantArgs
    tokens: int  # routed calibration tokens
    rows: int  # rows in the Hessian
    expert: bool
    sizes: list[int] = field(default_factory=list)  # rows of each member
    fallback: str | None = None
    clip: tuple[torch.Tensor, torch.Tensor] | None = None  # searched (lo, hi) range factors (sum out, G), RTN only


def split(res: QuantResult, sizes: list[int]) -> list[QuantResult]:
    """Row-split a stacked result back into its members."""
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        out.append(QuantResult(res.q[sl], res.scale[sl], res.zero[sl], res.args, res.g_idx, None, dict(res.info)))
        start += n
    return out


def _member_loss(r: QuantResult, W: torch.Tensor, H: torch.Tensor | None) -> float:
    D = r.dequantize() - W.float()  # (out, in)
    return float(((D @ H) * D).sum()) if H is not None else float(D.pow(2).sum())


def solve_tasks(tasks: list[Task], cfg: QuantConfig, scale_dtype, device) -> dict[str, tuple[QuantResult, dict]]:
    """Solve every task; -> {linear name: (result, row for the report)}."""
    expert_H = {}  # in_features -> Hessians of well-calibrated experts (for the avg-hessian fallback)
    for t in tasks:
        if t.expert and t.H is not None and t.tokens >= cfg.min_tokens:
            expert_H.setdefault(t.W.shape[1], []).append(t.H)
    plan: list[Task] = []
    for t in tasks:
        if cfg.solver == "gptq" and t.expert and t.tokens < cfg.min_tokens:
            if cfg.fallback == "avg-hessian" and expert_H.get(t.W.shape[1]):
                t.H, t.fallback = torch.stack(expert_H[t.W.shape[1]]).mean(0), "avg-hessian"
            else:
                t.fallback = "rtn"
        plan.append(t)

    out: dict[str, tuple[QuantResult, dict]] = {}
    buckets: dict[tuple, list[Task]] = {}
    for t in plan:
        use_gptq = cfg.solver == "gptq" and t.fallback != "rtn" and t.H is not None
        key = ("gptq" if use_gptq else "rtn", tuple(t.W.shape), t.args) + (() if cfg.batched_solve else (id(t),))
        buckets.setdefault(key, []).append(t)
    for (kind, _, args, *_), group in buckets.items():
        t0 = time.perf_counter()
        if kind == "gptq":
            k = cfg.gptq
            results = gptq(torch.stack([t.W for t in group]).to(device), torch.stack([t.H for t in group]).to(device),
                           args, blocksize=k.blocksize, damp=k.damp, act_order=k.act_order, mse_clip=k.mse_clip,
                           scale_dtype=scale_dtype)
        else:
            results = [rtn(t.W.to(device), args, scale_dtype, cfg.mse_clip, clip=t.clip) for t in group]
        per = (time.perf_counter() - t0) / len(group)
        for t, res in zip(group, results):
            start = 0
            for name, part, n in zip(t.names, split(res, t.sizes), t.sizes):
                part.loss = _member_loss(part, t.W[start:start + n], t.H)
                start += n
                out[name] = (part.cpu(), {"tokens": t.tokens, "rows": t.rows, "solver": kind, "fallback": t.fallback,
                                    "loss": part.loss, "seconds": per * n / sum(t.sizes), **res.info})
    return out
