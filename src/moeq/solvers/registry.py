"""The solver registry: every per-linear solver moeq can run, by name.

A solver is a pure function ``fn(W, H, args, opts, clips) -> list[QuantResult]`` over a batch of
equal-shaped linears: W (B, out, in) fp32, H (B, in, in) mean Hessians or None when the solver needs no
data, the grid ``args``, :class:`SolveOptions`, and per-matrix searched clip factors (or None). Methods
(:mod:`moeq.methods`) name the solver they use; registering a new one is one :func:`register_solver` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..quant.primitives import QuantArgs
from .base import QuantResult
from .gptq import gptq
from .rtn import rtn


@dataclass(frozen=True)
class SolveOptions:
    scale_dtype: torch.dtype | None = None  # scales are rounded to it (the checkpoint dtype)
    mse_clip: bool = False  # MSE-searched clip of every grid (RTN and GPTQ)
    blocksize: int = 128  # GPTQ lazy-update block
    damp: float = 0.01  # GPTQ relative damping
    act_order: bool = False  # GPTQ act-order with static groups
    positions: bool = False  # keep each weight's grid position before rounding (QuantResult.pre; blocktune)


SolveFn = Callable[[torch.Tensor, "torch.Tensor | None", QuantArgs, SolveOptions, "list | None"], list[QuantResult]]


@dataclass(frozen=True)
class Solver:
    name: str
    fn: SolveFn
    needs_hessian: bool  # True: the block loop gathers statistics (calibration data required)
    summary: str = ""


SOLVERS: dict[str, Solver] = {}


def register_solver(solver: Solver) -> Solver:
    SOLVERS[solver.name] = solver
    return solver


def get_solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; registered: {', '.join(SOLVERS)}") from None


def _rtn(W, H, args, opts, clips):
    return [rtn(W[b], args, opts.scale_dtype, opts.mse_clip, clip=clips[b] if clips else None, positions=opts.positions)
            for b in range(W.shape[0])]


def _gptq(W, H, args, opts, clips):
    return gptq(W, H, args, blocksize=opts.blocksize, damp=opts.damp, act_order=opts.act_order,
                mse_clip=opts.mse_clip, scale_dtype=opts.scale_dtype, positions=opts.positions)


register_solver(Solver("rtn", _rtn, needs_hessian=False, summary="round to nearest (optionally MSE-clipped)"))
register_solver(Solver("gptq", _gptq, needs_hessian=True,
                       summary="GPTQ: column-wise error feedback through the inverse Hessian"))
