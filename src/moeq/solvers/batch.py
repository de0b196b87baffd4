"""Turn one group's tasks into solver calls, batched over equal shapes within a memory budget.

Linears that share an input (q/k/v; an expert's gate and up) share a Hessian and arrive as one
row-stacked task. Tasks of equal shape and grid (the same projection of every expert of a layer) are
solved in batched calls of as many tasks as ``max_bytes`` allows (estimated working set per matrix:
about six (out, in) and seven (in, in) fp32 tensors for GPTQ); every matrix is solved independently, so
how a bucket is split never changes a result (tested). Tasks marked ``fallback="rtn"`` or without a
Hessian go to RTN whatever the solver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..quant.primitives import QuantArgs, hessian_error
from .base import QuantResult
from ..utils.memory import trim_heap
from .registry import Solver, SolveOptions, get_solver


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
    clip: tuple[torch.Tensor, torch.Tensor] | None = None  # searched (lo, hi) range factors (sum out, G)


def split(res: QuantResult, sizes: list[int]) -> list[QuantResult]:
    """Row-split a stacked result back into its members."""
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        out.append(QuantResult(res.q[sl], res.scale[sl], res.zero[sl], res.args, res.g_idx, None, dict(res.info),
                               res.pre[sl] if res.pre is not None else None))
        start += n
    return out


def _member_loss(r: QuantResult, W: torch.Tensor, H: torch.Tensor | None) -> float:
    D = r.dequantize() - W.float()  # (out, in)
    return float(hessian_error(D, H))


def is_dead(t: Task, min_tokens: int) -> bool:
    """An expert task with too few routed calibration tokens for a trustworthy Hessian."""
    return t.expert and t.tokens < min_tokens


def add_expert_hessian(hsum: dict[int, list], t: Task) -> None:
    """Accumulate a well-calibrated expert's Hessian by input width (for the avg-hessian fallback)."""
    if t.expert and t.H is not None:
        acc = hsum.setdefault(t.W.shape[1], [0.0, 0])
        acc[0], acc[1] = acc[0] + t.H, acc[1] + 1


def assign_fallbacks(dead: list[Task], hsum: dict[int, list], policy: str) -> list[Task]:
    """The documented fallback of under-calibrated experts: the mean Hessian of the group's well-calibrated
    experts of the same width ("avg-hessian", when there are any), else RTN. The decision is recorded."""
    for t in dead:
        acc = hsum.get(t.W.shape[1])
        if policy == "avg-hessian" and acc is not None:
            t.H, t.fallback = acc[0] / acc[1], "avg-hessian"
        else:
            t.fallback = "rtn"
    return dead


def with_fallbacks(tasks: list[Task], min_tokens: int, policy: str) -> list[Task]:
    """All tasks of one group, under-calibrated experts given their fallback."""
    hsum: dict[int, list] = {}
    for t in tasks:
        if not is_dead(t, min_tokens):
            add_expert_hessian(hsum, t)
    return [t for t in tasks if not is_dead(t, min_tokens)] + assign_fallbacks(
        [t for t in tasks if is_dead(t, min_tokens)], hsum, policy)


def solve_bytes(out: int, n_in: int) -> int:
    """Estimated working set of one (out, in) matrix in a batched solve."""
    return 4 * (6 * out * n_in + 7 * n_in * n_in)


def _chunks(group: list[Task], max_bytes: int | None) -> list[list[Task]]:
    if max_bytes is None:
        return [group]
    per = max(1, max_bytes // solve_bytes(*group[0].W.shape))
    return [group[k:k + per] for k in range(0, len(group), per)]


def solve_tasks(tasks: list[Task], solver: Solver, opts: SolveOptions, device="cpu", batched: bool = True,
                max_bytes: int | None = None) -> dict[str, tuple[QuantResult, dict]]:
    """Solve every task; -> {linear name: (result, row for the report)}."""
    rtn = get_solver("rtn")
    buckets: dict[tuple, list[Task]] = {}
    for t in tasks:
        s = solver if t.fallback != "rtn" and (t.H is not None or not solver.needs_hessian) else rtn
        key = (s.name, tuple(t.W.shape), t.args) + (() if batched else (id(t),))
        buckets.setdefault(key, []).append(t)
    out: dict[str, tuple[QuantResult, dict]] = {}
    for (name, _, args, *_), group in buckets.items():
        s = solver if name == solver.name else rtn
        for chunk in _chunks(group, max_bytes):
            t0 = time.perf_counter()
            W = torch.stack([t.W for t in chunk]).to(device)  # (B, out, in)
            H = torch.stack([t.H for t in chunk]).to(device) if s.needs_hessian else None  # (B, in, in)
            clips = [t.clip for t in chunk] if any(t.clip is not None for t in chunk) else None
            results = s.fn(W, H, args, opts, clips)
            del W, H
            per = (time.perf_counter() - t0) / len(chunk)
            for t, res in zip(chunk, results):
                start = 0
                for member, part, n in zip(t.names, split(res, t.sizes), t.sizes):
                    part.loss = _member_loss(part, t.W[start:start + n], t.H)
                    start += n
                    out[member] = (part.cpu(), {"tokens": t.tokens, "rows": t.rows, "solver": s.name,
                                                "fallback": t.fallback, "loss": part.loss,
                                                "seconds": per * n / sum(t.sizes), **res.info})
            del results
            trim_heap()  # each call's temporaries, freed, would otherwise stay in the C heap (see utils.memory)
    return out
