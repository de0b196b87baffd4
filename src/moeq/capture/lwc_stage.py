"""OmniQuant-style learnable weight clipping as a per-block stage of the one block loop.

For block i: its full-precision outputs on the current calibration inputs are the targets; the
clip factors of all its quantized linears are trained jointly (:func:`moeq.solvers.lwc.learn_clipping`)
with the block run through ``torch.func.functional_call`` on fake-quantized weights, so the model is
never modified here. The block loop then rounds each linear with its learned range. Unlike OmniQuant,
whose targets come from the full-precision model's own activations, the targets here are the FP block
applied to the already-quantized previous blocks' outputs (the loop's usual error propagation).
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from ..models.moe import ExpertSet
from ..solvers.lwc import learn_clipping
from .hooks import _to, block_output


class LWCStage:
    """Callable stage ``(adapter, i, block, inps, device) -> {linear name: (lo, hi)}``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.info: dict[int, dict] = {}
        self.clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, adapter, i, block, inps, device):
        k = self.cfg.lwc
        es = adapter.experts(i)
        if isinstance(es, ExpertSet):
            es.coverage_all = False
        prefix = adapter.block_name(i) + "."
        names = [li.name for li in adapter.block_linears(i) if self.cfg.plan.args_for(li.name) is not None]
        if not names or k.epochs == 0:
            return {}
        with torch.no_grad():
            targets = [block_output(block, h, kw, device) for h, kw in inps]  # (b, T, H) each
        weights = {n: adapter.module(n).weight.data for n in names}
        batches = [(h.to(device), _to(kw, device), t) for (h, kw), t in zip(inps, targets)]

        def block_loss(W_hat, batch):
            hidden, kw, target = batch
            params = {f"{n[len(prefix):]}.weight": W for n, W in W_hat.items()}
            out = functional_call(block, params, (hidden,), kw)
            out = out[0] if isinstance(out, tuple) else out
            return torch.nn.functional.mse_loss(out.float(), target.float())

        frozen = [p for p in block.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)  # only the clip logits learn
        try:
            clips, info = learn_clipping(weights, self.cfg.plan.args_for, batches, block_loss, k.epochs, k.lr, k.init)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        self.info[i] = info
        self.clips.update(clips)
        return clips
