"""Sensitivity of every linear at every candidate width: the expected squared error it adds per token.

Each linear is solved at each candidate width with the run's own solver (GPTQ batched over equal shapes,
or RTN) on the Hessian of the full-precision calibration pass, H = mean of x x^T over the rows it saw
(exactly what the quantization run will use). Its sensitivity is then the output error of that solution
measured where it lands, per calibration token:

    sens = tr(dW H_imp dW^T),   H_imp = (1/N) sum_t c_t^2 x_t x_t^T

with N all calibration tokens and c_t the coefficient the model multiplies the module's output by (the
router's combine weight for a routed expert, the sigmoid gate for a gated shared expert, 1 elsewhere);
a routed expert only sums the tokens routed to it. Rarely routed and lightly weighted experts are thus
cheap to quantize coarsely, and errors of attention, shared and routed linears become comparable.
An expert no calibration token reached has sensitivity 0. Sensitivities are what
:func:`moeq.allocate.search.allocate` minimises under a bit budget.

The statistics are those of the FP model (the two-pass design: profile, allocate, then solve), so a
sequential quantization run, whose later blocks see quantized inputs, measures slightly different
errors; ``moeq plan --measure`` reports both.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..capture.stats import GroupStats
from ..capture.solve import SolveSpec
from ..quant.primitives import QuantArgs, hessian_error
from ..solvers.batch import Task, solve_tasks, with_fallbacks
from .modules import ModuleRecord

WEIGHTED_ROLES = ("expert", "shared")  # outputs scaled by a per-token coefficient c


def impact_hessians(gs: GroupStats, gw: GroupStats | None, records: dict[str, ModuleRecord],
                    total_tokens: int) -> dict[str, torch.Tensor | None]:
    """{name: H_imp (in, in)} from the plain statistics ``gs`` and the c^2-weighted ones ``gw``."""
    out = {}
    for name in gs.modules:
        src = gw if gw is not None and records[name].role in WEIGHTED_ROLES and name in gw.modules else gs
        st = src.stats.get(src.owner(name))
        out[name] = st.H.float() / max(1, total_tokens) if st is not None else None
    return out


def candidate_losses(weights: dict[str, torch.Tensor], gs: GroupStats, impact: dict[str, torch.Tensor | None],
                     records: dict[str, ModuleRecord], candidates: list[int], template: QuantArgs,
                     spec: SolveSpec, device) -> dict[str, dict[int, float]]:
    """{name: {bits: sensitivity}} for the linears of one block. weights: name -> W (out, in)."""
    out: dict[str, dict[int, float]] = {n: {} for n in weights}
    for bits in candidates:
        args = replace(template, num_bits=bits)
        tasks = []
        for name, W in weights.items():
            args.check_width(W.shape[1], name)
            st = gs.stats.get(gs.owner(name))
            tasks.append(Task(names=[name], W=W.float(), H=st.mean() if st is not None else None, args=args,
                              tokens=st.routed if st is not None else 0, rows=st.rows if st is not None else 0,
                              expert=records[name].role == "expert", sizes=[W.shape[0]]))
        tasks = with_fallbacks(tasks, spec.min_tokens, spec.fallback) if spec.solver.needs_hessian else tasks
        for name, (res, _row) in solve_tasks(tasks, spec.solver, spec.opts, device, spec.batched).items():
            H = impact[name]
            if H is None:
                out[name][bits] = 0.0
                continue
            D = res.dequantize().to(H.device) - weights[name].float()  # (out, in)
            out[name][bits] = float(hessian_error(D, H))
    return out


def routed_tokens(gs: GroupStats | None, names: list[str]) -> dict[str, int]:
    """Calibration rows each linear computed (0 for an expert no token reached)."""
    out = {}
    for n in names:
        st = gs.stats.get(gs.owner(n)) if gs is not None else None
        out[n] = st.routed if st is not None else 0
    return out
