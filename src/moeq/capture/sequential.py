"""The one block loop: capture block-0 inputs, then per block calibrate -> solve -> propagate.

For every block, each true-sequential group (from the registry: q,k,v -> o -> every expert's and
shared expert's gate/up -> every down) is handled in turn: hooks accumulate the statistics of the
group's linears over all calibration batches, the group is solved (batched over experts) and its
dequantized weights are written back, so later groups see the already-quantized earlier ones.
Finally the quantized block is run once more and its outputs become the next block's inputs.
Only the current block lives on the compute device; statistics are freed once solved.

RTN needs no data: the same loop visits the same linears and skips the forward passes.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..config import QuantConfig
from ..models.adapter import ModelAdapter, get_submodule
from ..models.moe import ExpertSet, RoutedCall
from ..solvers.base import QuantResult
from ..solvers.batch import Task, solve_tasks
from ..utils.progress import log, progress
from .hooks import block_output, capture_first_block_inputs
from .stats import GroupStats


@dataclass
class LoopResult:
    results: dict[str, QuantResult] = field(default_factory=dict)
    rows: dict[str, dict] = field(default_factory=dict)  # per-module report rows
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)  # block -> routed tokens per expert


def _routing_parents(adapter: ModelAdapter, i: int) -> dict[str, torch.nn.Module]:
    """Full name -> module of every module whose linears get per-row routing (experts, shared expert)."""
    out = {}
    es = adapter.experts(i)
    if isinstance(es, ExpertSet):
        base = f"{adapter.block_name(i)}.{adapter.spec.moe.experts}"
        out.update({f"{base}.{e}": ex for e, ex in enumerate(es)})
    shared = adapter.shared_expert(i)
    if shared is not None:
        out[f"{adapter.block_name(i)}.{adapter.spec.moe.shared_experts}"] = shared
    return out


@contextmanager
def shared_expert_routing(adapter: ModelAdapter, i: int):
    """Give the shared expert a RoutedCall per forward: c = its gate's coefficient per token
    (registry ``shared_combine``: sigmoid(shared_gate(x)), or 1 where the model applies none)."""
    shared = adapter.shared_expert(i)
    if shared is None:
        yield
        return
    gate = adapter.shared_gate(i) if adapter.spec.moe.shared_combine == "sigmoid_gate" else None

    def hook(mod, args):
        x = args[0].reshape(-1, args[0].shape[-1])  # (N, H)
        c = torch.sigmoid(gate(x)).reshape(-1) if gate is not None else torch.ones(x.shape[0], device=x.device)
        mod.moeq_routing = RoutedCall(torch.arange(x.shape[0], device=x.device), c,
                                      torch.ones_like(c, dtype=torch.bool))

    shared.moeq_routing = None
    h = shared.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        h.remove()
        shared.moeq_routing = None


def row_weight_fn(parents: dict[str, torch.nn.Module], agq: bool, unweighted_projs: tuple[str, ...] = ()):
    """Hook helper for linears inside experts / the shared expert: (row weights, routed-row count).

    With AGQ the weights are the combine coefficients c of each row (paired with its row by token
    index by construction: the ExpertSet hands each expert exactly its rows and their c)."""
    def fn(name, mod, x):
        parent_name, _, proj = name.rpartition(".")
        ex = parents.get(parent_name)
        rc = getattr(ex, "moeq_routing", None) if ex is not None else None
        if rc is None:
            return None, None
        w = rc.weight if agq and proj not in unweighted_projs else None
        return w, int(rc.routed.sum())
    return fn


def _tasks_for_group(adapter, i, names, gs: GroupStats | None, cfg: QuantConfig, infos, clips=None,
                     tokens=None) -> list[Task]:
    """Group members that share an input into row-stacked tasks (``clips``: searched (lo, hi) per linear)."""
    clips, tokens = clips or {}, tokens or {}
    owners: dict[str, list[str]] = {}
    for rel in names:
        full = f"{adapter.block_name(i)}.{rel}"
        if cfg.plan.args_for(full) is None:
            continue  # plan keeps it in full precision
        owner = gs.owner(full) if gs else full
        owners.setdefault(owner, []).append(full)
    tasks = []
    for owner, members in owners.items():
        st = gs.stats.get(owner) if gs else None
        # members sharing a Hessian are stacked only when their grids agree (mixed plans may differ)
        by_args: dict = {}
        for m in members:
            by_args.setdefault(cfg.plan.args_for(m), []).append(m)
        for args, ms in by_args.items():
            Ws = [adapter.module(m).weight.data for m in ms]
            for m, W in zip(ms, Ws):
                args.check_width(W.shape[1], m)
            info = infos[ms[0]]
            tasks.append(Task(
                names=ms, W=torch.cat(Ws, 0).float(), H=st.mean() if st is not None else None, args=args,
                tokens=st.routed if st is not None else tokens.get(ms[0], 0), rows=st.rows if st is not None else 0,
                expert=info.role == "expert", sizes=[W.shape[0] for W in Ws],
                clip=tuple(torch.cat([clips[m][j] for m in ms]) for j in (0, 1)) if all(m in clips for m in ms)
                else None))
    return tasks


def _write_back(adapter, solved: dict[str, tuple[QuantResult, dict]], out: LoopResult, infos, storage_dtype) -> None:
    """Dequantized weights go back rounded to the checkpoint dtype: exactly what a loader of the export gets."""
    for name, (res, row) in solved.items():
        mod = adapter.module(name)
        W_hat = res.dequantize()  # (out, in) fp32
        if storage_dtype is not None:
            W_hat = W_hat.to(storage_dtype)
        mod.weight.data = W_hat.to(mod.weight.dtype).to(mod.weight.device)
        li = infos[name]
        out.results[name] = res
        out.rows[name] = {"name": name, "block": li.block, "role": li.role, "expert": li.expert,
                          "bits": res.args.num_bits, "group_size": res.args.group_size,
                          "symmetric": res.args.symmetric, "params": res.q.numel(),
                          "out_features": res.q.shape[0], "in_features": res.q.shape[1], **row}


@torch.no_grad()
def quantize_model(adapter: ModelAdapter, cfg: QuantConfig, calib: torch.Tensor | None, device,
                   scale_dtype: torch.dtype | None, block_stage=None) -> LoopResult:
    """Quantize every planned linear of ``adapter.model`` in place (fake-quant weights); -> LoopResult.

    calib: (n, T) token ids, required for calibrated methods.
    block_stage: optional per-block search run before the block's linears are solved (AWQ, LWC):
    ``(adapter, i, block, inps, device) -> {linear name: (lo, hi) clip factors}``; it may rewrite the
    block function-preservingly (AWQ scales) and may expose ``tokens`` (routed rows per linear).
    """
    out = LoopResult()
    model = adapter.model
    inps = None
    if cfg.needs_calibration:
        if calib is None or calib.numel() == 0:
            raise ValueError("the calibration set is empty: give --calib a source with text and --nsamples >= 1")
        batches = list(calib.split(cfg.batch_size))
        inps = capture_first_block_inputs(model, adapter.blocks[0], batches)
    for i in progress(range(adapter.num_blocks), desc=f"{cfg.method} blocks", unit="block", leave=True):
        t_block = time.perf_counter()
        block = adapter.blocks[i]
        home = next(block.parameters()).device
        block.to(device)  # onload: only the current block needs the compute device
        infos = {li.name: li for li in adapter.block_linears(i)}
        clips = block_stage(adapter, i, block, inps, device) if block_stage is not None else {}
        parents = _routing_parents(adapter, i)
        gate_name = adapter.spec.moe.proj_names[0] if adapter.spec.moe else ""
        weight_fn = row_weight_fn(parents, cfg.agq, () if cfg.agq_gate_proj else (gate_name,))
        es = adapter.experts(i)
        if isinstance(es, ExpertSet):
            es.coverage_all = cfg.expert_coverage == "all" and cfg.needs_calibration
        groups = adapter.groups(i)
        if not cfg.true_sequential:  # every linear sees the block's unquantized inputs: one pass, not one per group
            groups = [[n for g in groups for n in g]]
        for names in groups:
            gs = None
            if cfg.needs_calibration and cfg.solver == "gptq":  # RTN needs no Hessian
                modules = {f"{adapter.block_name(i)}.{n}": get_submodule(block, n) for n in names}
                routed = any(infos[n].role == "expert" for n in modules)  # experts may not all run
                gs = GroupStats(modules, device, weight_fn, stop_when_complete=not routed)
                with gs, shared_expert_routing(adapter, i):
                    for hidden, kw in inps:
                        gs.new_forward()
                        block_output(block, hidden, kw, device)
            tasks = _tasks_for_group(adapter, i, names, gs, cfg, infos, clips, getattr(block_stage, "tokens", None))
            solved = solve_tasks(tasks, cfg, scale_dtype, device)
            _write_back(adapter, solved, out, infos, scale_dtype)
            del gs
        if isinstance(es, ExpertSet):
            es.coverage_all = False
            out.expert_tokens[i] = [out.rows.get(f"{adapter.block_name(i)}.{adapter.spec.moe.experts}.{e}."
                                                 f"{adapter.spec.moe.proj_names[0]}", {}).get("tokens", 0)
                                    for e in range(len(es))]
        if inps is not None and i + 1 < adapter.num_blocks:
            inps = [(block_output(block, h, kw, device).cpu(), kw) for h, kw in inps]
        block.to(home)
        log.debug("block %d done in %.1fs", i, time.perf_counter() - t_block)
    return out
