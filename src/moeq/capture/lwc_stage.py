"""Learnable weight clipping (OmniQuant's LWC, without its LET) as a stage of the one block loop.

For block i: its full-precision outputs on the current calibration inputs are the targets; the
clip factors of all its quantized linears are trained jointly (:func:`moeq.solvers.lwc.learn_clipping`)
with the block run through ``torch.func.functional_call`` on fake-quantized weights, so the model is
never modified here. The solve stage then rounds each linear with its learned range. Unlike OmniQuant,
whose targets come from the full-precision model's own activations, the targets here are the FP block
applied to the already-quantized previous blocks' outputs (the loop's usual error propagation).
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from ..config import LWCKnobs
from ..quant.primitives import QuantArgs
from ..solvers.lwc import learn_clipping
from .hooks import _to
from .loop import BlockContext, SearchResult


def lwc_block(ctx: BlockContext, plan: dict[str, QuantArgs | None], k: LWCKnobs,
              scale_dtype: torch.dtype | None = None) -> SearchResult:
    """Clip factors for every planned linear of block ``ctx.i``, trained jointly against its FP outputs."""
    names = [li.name for li in ctx.adapter.block_linears(ctx.i) if plan.get(li.name) is not None]
    if not names or k.epochs == 0:
        return SearchResult()
    with torch.no_grad():
        targets = ctx.outputs()  # (b, T, H) each
    weights = {n: ctx.adapter.module(n).weight.data for n in names}
    batches = [(h.to(ctx.device), _to(kw, ctx.device), t) for (h, kw), t in zip(ctx.acts, targets)]
    block = ctx.block

    def block_loss(W_hat, batch):
        hidden, kw, target = batch
        params = {f"{ctx.rel(n)}.weight": W for n, W in W_hat.items()}
        out = functional_call(block, params, (hidden,), kw)
        out = out[0] if isinstance(out, tuple) else out
        return torch.nn.functional.mse_loss(out.float(), target.float())

    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # only the clip logits learn
    try:
        clips, info = learn_clipping(weights, plan.get, batches, block_loss, k.epochs, k.lr, k.init, scale_dtype)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return SearchResult(clips=clips, info={"block": ctx.i, **info})
