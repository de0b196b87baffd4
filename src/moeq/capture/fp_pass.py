"""A full-precision pass over the blocks that only observes: the profile pass of mixed precision.

Same mechanics as the quantization loop (:mod:`.sequential`): block-0 inputs captured once, then per
block one forward per calibration batch with the block onloaded to the compute device, and its outputs
(kept on CPU) become the next block's inputs. Nothing is quantized, so one forward per batch feeds every
hook of the block at once: a :class:`~.stats.GroupStats` over the linears the caller names, a second
one over routed/shared-expert linears whose rows are weighted by c^2 (c = the coefficient the model
multiplies that expert's output by; the same routing the AGQ Hessians use), and a pre-hook on the
block's post-attention norm that hands the caller the residual stream entering the MoE sub-block.
Callers get device tensors and keep what they need via :func:`offload`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..models.adapter import ModelAdapter, get_submodule
from ..utils.progress import progress
from .hooks import block_output, capture_first_block_inputs
from .sequential import _routing_parents, row_weight_fn, shared_expert_routing
from .stats import GroupStats


def offload(t: torch.Tensor) -> torch.Tensor:
    """Where observed activations are kept between blocks: CPU, fp32."""
    return t.detach().float().cpu()


def c2_weight_fn(adapter: ModelAdapter, i: int):
    """Row weights c^2 for the expert / shared-expert linears of block i (same tensor for linears sharing an
    input, so their Hessians stay aliased)."""
    base = row_weight_fn(_routing_parents(adapter, i), agq=True)
    memo: dict = {}

    def fn(name, mod, x):
        w, routed = base(name, mod, x)
        if w is None:
            return None, routed
        if memo.get("w") is not w:
            memo.update(w=w, c2=w.float().pow(2))  # (r,)
        return memo["c2"], routed
    return fn


@torch.no_grad()
def fp_block_pass(adapter: ModelAdapter, calib: torch.Tensor, device, batch_size: int,
                  modules_of: Callable[[int], dict[str, torch.nn.Module]],
                  on_batch: Callable[[int, torch.Tensor, torch.Tensor], None],
                  on_block: Callable[[int, GroupStats | None, GroupStats | None], None],
                  weighted_of: Callable[[int], dict[str, torch.nn.Module]] | None = None) -> None:
    """For every block i: forward all batches of ``calib`` (n, T) with statistics hooks on
    ``modules_of(i)`` (plain Hessians) and ``weighted_of(i)`` (c^2-weighted Hessians); ``on_batch(i, x, y)``
    gets the sub-block input x and block output y (b, T, d) on the device; ``on_block(i, stats, weighted)``
    runs after the last batch while the block is still onloaded."""
    inps = capture_first_block_inputs(adapter.model, adapter.blocks[0], list(calib.split(batch_size)))
    for i in progress(range(adapter.num_blocks), desc="profile blocks", unit="block", leave=True):
        block = adapter.blocks[i]
        home = next(block.parameters()).device
        block.to(device)
        modules = modules_of(i)
        gs = GroupStats(modules, device) if modules else None
        wmods = weighted_of(i) if weighted_of is not None else {}
        gw = GroupStats(wmods, device, c2_weight_fn(adapter, i)) if wmods else None
        xs: list[torch.Tensor] = []
        norm = get_submodule(block, adapter.spec.post_attn_norm)
        handle = norm.register_forward_pre_hook(lambda m, a: xs.append(a[0])) if norm is not None else None
        outs = []
        try:
            for st in (gs, gw):
                if st is not None:
                    st.__enter__()
            with shared_expert_routing(adapter, i):
                for hidden, kw in inps:
                    for st in (gs, gw):
                        if st is not None:
                            st.new_forward()
                    xs.clear()
                    y = block_output(block, hidden, kw, device)  # (b, T, d)
                    on_batch(i, xs[0] if xs else hidden.to(device), y)
                    outs.append(y.cpu())
        finally:
            for st in (gs, gw):
                if st is not None:
                    st.__exit__(None, None, None)
            if handle is not None:
                handle.remove()
        on_block(i, gs, gw)
        block.to(home)
        inps = [(y, kw) for y, (_, kw) in zip(outs, inps)]
