"""The solve stage of one block: statistics, then solves, group by group, within a memory budget.

Each true-sequential group (from the registry: q,k,v -> o -> every expert's and shared expert's
gate/up -> every down) is handled in turn: hooks accumulate the statistics of the group's linears over
all calibration batches, the group is solved (batched over experts) and its dequantized weights are
written back, so later groups see the already-quantized earlier ones. Statistics that would not fit the
memory budget are gathered in several passes over a subset of the group's modules each (the members of
one module always together, so linears sharing an input still share a Hessian); within a pass, equal-
shaped solves are batched as far as the budget allows (:func:`moeq.solvers.batch.solve_tasks`). Linears
of one group never feed each other, so neither split changes a result.

Experts with fewer than ``min_tokens`` routed calibration tokens get the fallback: RTN, or the solver
with the mean Hessian of the group's well-calibrated experts of the same input width (accumulated over
every pass, so the split does not change it either). RTN needs no data: the same groups are visited
without forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..quant.primitives import QuantArgs
from ..solvers.base import QuantResult
from ..solvers.gptq import gptaq_target
from ..solvers.batch import Task, add_expert_hessian, assign_fallbacks, is_dead, solve_tasks
from ..solvers.registry import Solver, SolveOptions
from ..utils.dist import Dist
from ..utils.memory import free_bytes, trim_heap
from .loop import BlockContext
from .parallel import assign_owners, reduce_hessians, share_hessian_sums, share_results, share_stats
from .stats import GroupStats, row_weight_fn


@dataclass(frozen=True)
class SolveSpec:
    """Everything the stage needs, resolved once per run."""

    plan: dict[str, QuantArgs | None]  # full linear name -> grid (None: full precision)
    solver: Solver
    opts: SolveOptions
    storage_dtype: torch.dtype | None = None  # weights written back are rounded to it (what the export holds)
    agq: bool = False
    agq_gate_proj: bool = True
    coverage_all: bool = False
    min_tokens: int = 8
    fallback: str = "rtn"
    true_sequential: bool = True
    batched: bool = True
    max_memory: int | None = None  # bytes for one pass's statistics + one batched solve; None: default_budget()
    dist: Dist = Dist()  # several ranks: statistics summed, each solves its share (capture.parallel)


@dataclass
class BlockSolved:
    results: dict[str, QuantResult] = field(default_factory=dict)
    rows: dict[str, dict] = field(default_factory=dict)  # per-linear report rows
    passes: int = 0  # statistics passes over the calibration set


def default_budget(device) -> int:
    """Half the free memory of an accelerator; on CPU at most 1 GiB (batching more experts per call buys
    little there, and host RAM is what keeps a streamed run flat)."""
    free = free_bytes(device) // 2
    return free if torch.device(device).type != "cpu" else min(free, 1 << 30)


def _hessian_bytes(n_in: int) -> int:
    return 8 * n_in * n_in  # the fp64 sum (capture.stats)


def _units(ctx: BlockContext, names: list[str]) -> list[list[str]]:
    """Block-relative names grouped by parent module (an expert, self_attn, ...), in order."""
    units: dict[str, list[str]] = {}
    for n in names:
        units.setdefault(n.rpartition(".")[0], []).append(n)
    return list(units.values())


def _passes(ctx: BlockContext, units: list[list[str]], budget: int) -> list[list[str]]:
    """Split the units into statistics passes whose Hessians take at most half the budget."""
    out, cur, size = [], [], 0
    for u in units:
        b = _hessian_bytes(ctx.adapter.module(f"{ctx.name}.{u[0]}").in_features)
        if cur and size + b > budget // 2:
            out.append(cur)
            cur, size = [], 0
        cur, size = cur + u, size + b
    return out + ([cur] if cur else [])


def _tasks(ctx, names, gs: GroupStats | None, spec: SolveSpec, clips, tokens, rank_of: dict[str, int]) -> list[Task]:
    """Planned linears sharing an input (and a grid) become one row-stacked task; only the tasks this rank
    solves (``rank_of``: owner -> rank)."""
    owners: dict[str, list[str]] = {}
    for rel in names:
        full = f"{ctx.name}.{rel}"
        owner = gs.owner(full) if gs else full
        if spec.plan.get(full) is not None and rank_of[owner] == spec.dist.rank:
            owners.setdefault(owner, []).append(full)
    infos = {li.name: li for li in ctx.adapter.block_linears(ctx.i)}
    tasks = []
    for owner, members in owners.items():
        st = gs.stats.get(owner) if gs else None
        by_args: dict = {}
        for m in members:  # members sharing a Hessian are stacked only when their grids agree
            by_args.setdefault(spec.plan[m], []).append(m)
        for args, ms in by_args.items():
            Ws = [ctx.adapter.module(m).weight.data for m in ms]
            for m, W in zip(ms, Ws):
                args.check_width(W.shape[1], m)
            W = torch.cat(Ws, 0).float()  # (sum out, in)
            C = st.cross_mean() if st is not None else None
            H = st.take_mean() if st is not None else None
            if C is not None:  # GPTAQ: GPTQ on the least-squares target of the FP outputs
                W = gptaq_target(W, H, C, spec.opts.damp)
            tasks.append(Task(
                names=ms, W=W, H=H, args=args,
                tokens=st.routed if st is not None else tokens.get(ms[0], 0), rows=st.rows if st is not None else 0,
                expert=infos[ms[0]].role == "expert", sizes=[W.shape[0] for W in Ws],
                clip=tuple(torch.cat([clips[m][j] for m in ms]) for j in (0, 1)) if all(m in clips for m in ms)
                else None))
    return tasks


def _write_back(ctx, solved: dict[str, tuple[QuantResult, dict]], out: BlockSolved, storage_dtype) -> None:
    """Dequantized weights go back rounded to the checkpoint dtype: exactly what a loader of the export gets."""
    infos = {li.name: li for li in ctx.adapter.block_linears(ctx.i)}
    for name, (res, row) in solved.items():
        mod = ctx.adapter.module(name)
        W_hat = res.dequantize()  # (out, in) fp32
        if storage_dtype is not None and not res.args.float_zero:  # K-quant minima: GGUF-only, llama.cpp's fp32 values
            W_hat = W_hat.to(storage_dtype)
        mod.weight.data = W_hat.to(mod.weight.dtype).to(mod.weight.device)
        li = infos[name]
        out.results[name] = res
        out.rows[name] = {"name": name, "block": li.block, "role": li.role, "expert": li.expert,
                          "bits": res.args.num_bits, "group_size": res.args.group_size,
                          "symmetric": res.args.symmetric, "group_bits": res.args.group_bits(), "params": res.q.numel(),
                          "out_features": res.q.shape[0], "in_features": res.q.shape[1], **row}


def _mark(solved: dict, spec: SolveSpec) -> dict:
    """Report rows say which rank solved each linear (several ranks only)."""
    if spec.dist.enabled:
        for _, row in solved.values():
            row["rank"] = spec.dist.rank
    return solved


@torch.no_grad()
def solve_block(ctx: BlockContext, spec: SolveSpec, clips: dict | None = None,
                tokens: dict | None = None, fp_inputs=None) -> BlockSolved:
    """Quantize every planned linear of block ``ctx.i`` in place (fake-quant weights); ``clips``: searched
    (lo, hi) range factors per linear (AWQ clip, LWC); ``tokens``: routed rows per linear when a search
    measured them (data-free solvers report those); ``fp_inputs`` (GPTAQ): the FP model's input rows of
    the block's linears (:class:`moeq.capture.fp_stream.FPInputs`)."""
    out = BlockSolved()
    clips, tokens = clips or {}, tokens or {}
    calibrated = spec.solver.needs_hessian and ctx.acts is not None
    groups = ctx.adapter.groups(ctx.i)
    if not spec.true_sequential:  # every linear sees the block's unquantized inputs: one pass, not one per group
        groups = [[n for g in groups for n in g]]
    gate = ctx.adapter.spec.moe.proj_names[0] if ctx.adapter.spec.moe else ""
    infos = {li.name: li for li in ctx.adapter.block_linears(ctx.i)}
    for names in groups:
        budget = spec.max_memory or default_budget(ctx.device)
        hsum: dict[int, list] = {}  # in_features -> [sum of well-calibrated expert Hessians, count]
        dead: list[Task] = []
        for part in _passes(ctx, _units(ctx, names), budget) if calibrated else [names]:
            gs = None
            if calibrated:
                modules = {f"{ctx.name}.{n}": ctx.adapter.module(f"{ctx.name}.{n}") for n in part}
                routed = any(infos[n].role == "expert" for n in modules)  # experts may not all run
                with ctx.adapter.routing(ctx.i, spec.coverage_all) as r:
                    unweighted = () if spec.agq_gate_proj else (gate,)
                    if fp_inputs is not None:
                        fp_inputs.routing = r
                    gs = GroupStats(modules, ctx.device, row_weight_fn(r, spec.agq, unweighted),
                                    stop_when_complete=not routed, fp_rows=fp_inputs.rows if fp_inputs else None)
                    with gs:
                        ctx.forward(before_batch=gs.new_forward)
                share_stats(gs, spec.dist)
                out.passes += 1
            rank_of = assign_owners(ctx, part, gs, spec.plan, spec.dist)
            if gs is not None:
                reduce_hessians(gs, rank_of, spec.dist)
            ready = []
            for t in _tasks(ctx, part, gs, spec, clips, tokens, rank_of):
                if calibrated and is_dead(t, spec.min_tokens):
                    dead.append(t)
                else:
                    add_expert_hessian(hsum, t)
                    ready.append(t)
            solved = _mark(solve_tasks(ready, spec.solver, spec.opts, ctx.device, spec.batched, budget // 2), spec)
            _write_back(ctx, share_results(solved, spec.dist), out, spec.storage_dtype)
            del gs, ready, solved
            trim_heap()
        if spec.dist.sum_(torch.tensor([len(dead)]))[0] > 0:  # too few routed tokens: the documented fallback
            if spec.fallback == "avg-hessian":
                hsum = share_hessian_sums(hsum, spec.dist, ctx.device)
            assign_fallbacks(dead, hsum, spec.fallback)
            solved = _mark(solve_tasks(dead, spec.solver, spec.opts, ctx.device, spec.batched, budget // 2), spec)
            _write_back(ctx, share_results(solved, spec.dist), out, spec.storage_dtype)
    return out


def expert_tokens(ctx: BlockContext, rows: dict[str, dict]) -> list[int] | None:
    """Routed calibration tokens per expert of block i (from the first projection's rows), None if dense."""
    es = ctx.adapter.experts(ctx.i)
    if es is None:
        return None
    moe = ctx.adapter.spec.moe
    return [rows.get(f"{ctx.name}.{moe.experts}.{e}.{moe.proj_names[0]}", {}).get("tokens", 0) for e in range(len(es))]
