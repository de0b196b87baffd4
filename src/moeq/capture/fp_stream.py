"""The full-precision model's own activations, carried through the block loop next to the quantized ones.

GPTAQ (``--gptaq``) and the block tuner's asymmetric targets need what the FP model computes, not the FP
block applied to the quantized stream. :func:`fp_pass` runs block i, before anything in it is quantized,
on the FP stream's batches (block i's FP inputs) and returns:

* the block's outputs (the FP stream's next generation, also the tuner's output targets);
* its router logits on those inputs (the tuner's routing targets);
* with ``inputs``: :class:`FPInputs`, the FP input rows of the block's linears per batch, paired row by row
  with the quantized stream's rows (GPTAQ's cross term). Linears that see every token are captured as
  they are; a routed expert's rows are taken from the FP input of the MoE layer at the tokens the
  *quantized* router gave that expert (its down projection's input is recomputed from them with the
  expert's FP gate/up weights), so both streams' rows belong to the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models.moe import RoutingObserver
from .activations import Activations
from .hooks import block_output
from .loop import BlockContext


@dataclass
class FPPass:
    outputs: list[torch.Tensor]  # FP block output per batch (b, T, H), on the device
    router_logits: list[torch.Tensor | None]  # per batch (N, E)
    weights: dict[str, torch.Tensor]  # FP weight (out, in) of every planned linear (full name)
    stream: Activations | None  # the FP stream's next generation (block i+1's FP inputs)
    inputs: "FPInputs | None" = None


@dataclass
class FPInputs:
    """FP input rows of the block's linears per calibration batch (see the module docstring)."""

    dense: list[dict[str, torch.Tensor]]  # per batch: full name -> (N, in) for linears that see every token
    moe_in: list[torch.Tensor | None]  # per batch: the MoE layer's FP input (N, H)
    experts: dict[str, tuple[str, str]]  # expert linear -> (expert module name, projection)
    weights: dict[str, torch.Tensor]  # FP weights (for a down projection's input)
    act: dict[str, object] = field(default_factory=dict)  # expert module name -> its activation function
    proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    routing: RoutingObserver | None = None  # the quantized forward's routing (set by the solve stage)

    def rows(self, name: str, k: int, n_rows: int) -> torch.Tensor | None:
        """FP rows paired with the quantized stream's ``n_rows`` input rows of linear ``name`` in batch k."""
        if name in self.experts:
            parent, proj = self.experts[name]
            call = self.routing.call(parent) if self.routing is not None else None
            if call is None or self.moe_in[k] is None:
                return None
            x = self.moe_in[k][call.token_idx].float()  # (n, H)
            if proj == self.proj_names[2]:
                g, u = (self.weights[f"{parent}.{p}"].float() for p in self.proj_names[:2])
                x = self.act[parent](F.linear(x, g)) * F.linear(x, u)  # (n, I)
            return x if x.shape[0] == n_rows else None
        x = self.dense[k].get(name)
        return x if x is not None and x.shape[0] == n_rows else None


@torch.no_grad()
def fp_pass(ctx: BlockContext, plan: dict, stream: Activations | None, inputs: bool = False) -> FPPass:
    """Block ``ctx.i`` in full precision (nothing in it quantized yet) on the FP ``stream`` (None: on the
    quantized stream, whose next generation the loop makes itself)."""
    ad = ctx.adapter
    router, es = ad.router(ctx.i), ad.experts(ctx.i)
    infos = {li.name: li for li in ad.block_linears(ctx.i)}
    weights = {n: ad.module(n).weight.data.detach().clone() for n in infos if plan.get(n) is not None}
    seen_router: list = []
    dense: list[dict] = []
    moe_in: list = []
    handles = []

    def keep(store_fn):
        def hook(mod, args):
            store_fn(args[0])
        return hook

    if router is not None:
        handles.append(router.register_forward_pre_hook(keep(lambda x: seen_router.append(x.reshape(-1, x.shape[-1])))))
    experts = {n: (n.rpartition(".")[0], n.rpartition(".")[2]) for n, li in infos.items() if li.role == "expert"}
    if inputs:
        for n in infos:
            if n not in experts:
                handles.append(ad.module(n).register_forward_pre_hook(
                    keep(lambda x, n=n: dense[-1].__setitem__(n, x.reshape(-1, x.shape[-1])))))
        if es is not None:
            handles.append(es.register_forward_pre_hook(keep(lambda x: moe_in.__setitem__(-1, x))))

    def run(k, h, kw):
        dense.append({})
        moe_in.append(None)
        return block_output(ctx.block, h, kw, ctx.device)
    try:
        if stream is None:
            outputs = [run(k, h, kw) for k, (h, kw) in enumerate(ctx.acts)]  # (b, T, H) each
            nxt = None
        else:
            nxt = stream.propagate(run)
            nxt.prune()  # on disk: the FP stream's older generations go
            outputs = [h.to(ctx.device) for h, _ in nxt]
    finally:
        for h in handles:
            h.remove()
    logits = ([F.linear(x.float(), router.weight.float()) for x in seen_router] if router is not None
              else [None] * len(outputs))
    fp_inputs = None
    if inputs:
        moe = ad.spec.moe
        fp_inputs = FPInputs(dense, moe_in, experts, weights,
                             act={p: ad.module(p).act_fn for p, _ in experts.values()},
                             proj_names=moe.proj_names if moe is not None else ("gate_proj", "up_proj", "down_proj"))
    return FPPass(outputs, logits, weights, nxt, fp_inputs)
