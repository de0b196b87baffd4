"""The block tuner (``--method blocktune``) as a stage of the one block loop, after the solve stage.

For block i, before the solve stage runs (:func:`moeq.capture.fp_stream.fp_pass`): the full-precision
block's outputs and router logits, and a copy of its FP weights. With ``asymmetric`` (the default) the
targets come from the FP model's own stream (:mod:`.fp_stream`), so the tuned block also corrects the drift
the earlier quantized blocks left in its inputs and its routing (the FP model's own expert choices are the
router target). Without it the FP block reads the quantized stream, as auto-round's default does. After
the solve stage (RTN, or GPTAQ with ``--tune-start gptaq``) has quantized the block (:func:`tune_solved`),
its integers and scales are tuned jointly (:func:`moeq.solvers.blocktune.tune_block`) to minimise

    ||y_q - y_fp||^2 / ||y_fp||^2                                  block output, relative
    + router * mean_t KL(softmax(l_fp) || softmax(l_q))            routing kept close to FP
    + expert * sum_e sum_t c_te ||E_e^q(x_t) - E_e(x_t)||^2 / sum c_te ||E_e(x_t)||^2

where l are the router logits on the block's hidden states (l_q: the quantized block on the quantized
stream; l_fp: the FP block on the FP stream), and the last term compares every routed expert (and the
shared expert) with its FP weights on every 4th of the rows it was given, held fixed (so it tunes the
expert's own weights and never pulls the attention that produced them), weighted by their combine
coefficients c (AGQ's affinity weighting). The block runs through
``torch.func.functional_call`` with the tuned weights substituted, so the model is only modified when the
tuned grids are written back. Dense blocks get the output term alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..solvers.blocktune import TuneKnobs, tune_block
from .fp_stream import FPPass
from .hooks import _to
from .loop import BlockContext
from .solve import BlockSolved, _write_back


def _mlp(mod, W: dict[str, torch.Tensor], x: torch.Tensor, names) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) with the weights W {proj: (out, in)}; x (n, H) -> (n, H)."""
    g, u, d = names
    return F.linear(mod.act_fn(F.linear(x, W[g])) * F.linear(x, W[u]), W[d])


# the expert term reads every 4th of an expert's rows: it recomputes each expert twice (FP and tuned) on its
# rows, which cost as much as the whole block forward on all of them; a strided quarter keeps the term's
# estimate unbiased at a quarter of the cost
EXPERT_ROW_STRIDE = 4


class _MoETerms:
    """Hooks that add the router and expert terms during one tuned forward of block i."""

    def __init__(self, ctx: BlockContext, fp_weights: dict[str, torch.Tensor]):
        self.ctx, self.router = ctx, ctx.adapter.router(ctx.i)
        self.parents = ctx.adapter.routing_parents(ctx.i)  # full name -> expert / shared expert module
        spec, es = ctx.adapter.spec, ctx.adapter.experts(ctx.i)
        routed = set(getattr(es, "names", ()))  # the ExpertSet's expert names; the rest is the shared expert
        self.names = {p: spec.moe.proj_names if p in routed else spec.mlp_proj_names for p in self.parents}
        self.fp = {p: {proj: fp_weights[f"{p}.{proj}"].float() for proj in self.names[p]
                       if f"{p}.{proj}" in fp_weights} for p in self.parents}
        self.router_in: list = []
        self.err = self.norm = 0.0

    def parent_hook(self, obs, name):
        def hook(mod, args, out):
            call = obs.call(name)
            W = self.fp[name]
            if call is None or len(W) < 3:  # a partly full-precision expert: compared through the output term
                return
            x = args[0].reshape(-1, args[0].shape[-1]).detach().float()  # (n, H): the term tunes the expert only
            x, c = x[::EXPERT_ROW_STRIDE], call.weight.detach().float()[::EXPERT_ROW_STRIDE, None]  # (n/4, H), (n/4, 1)
            with torch.no_grad():
                y_fp = _mlp(mod, W, x, self.names[name])  # (n/4, H)
            y_q = _mlp(mod, {p: getattr(mod, p).weight.float() for p in self.names[name]}, x, self.names[name])
            self.err = self.err + (c * (y_q - y_fp).pow(2)).sum()
            self.norm = self.norm + float((c * y_fp.pow(2)).sum())
        return hook

    def __enter__(self):
        self.handles, self.err, self.norm, self.router_in = [], 0.0, 0.0, []
        if self.router is not None:
            self.handles.append(self.router.register_forward_pre_hook(
                lambda mod, args: self.router_in.append(args[0].reshape(-1, args[0].shape[-1]))))
        self._routing = self.ctx.adapter.routing(self.ctx.i)
        obs = self._routing.__enter__()
        for name, mod in self.parents.items():
            self.handles.append(mod.register_forward_hook(self.parent_hook(obs, name)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self._routing.__exit__(*exc)

    def router_kl(self, fp_logits: torch.Tensor | None) -> torch.Tensor | float:
        if fp_logits is None or not self.router_in:
            return 0.0
        lq = F.linear(self.router_in[0].float(), self.router.weight.float())  # (N, E)
        return F.kl_div(F.log_softmax(lq, -1), F.log_softmax(fp_logits, -1), log_target=True, reduction="batchmean")


def tune_solved(ctx: BlockContext, solved: BlockSolved, targets: FPPass, knobs: TuneKnobs,
                storage_dtype: torch.dtype | None) -> dict:
    """Tune block ``ctx.i``'s solved grids in place (results, report rows and the block's weights). -> info."""
    names = [n for n in solved.results if n in targets.weights]
    if not names or knobs.steps == 0:
        return {}
    block = ctx.block
    batches = [(h.to(ctx.device), _to(kw, ctx.device), t, lg)
               for (h, kw), t, lg in zip(ctx.acts, targets.outputs, targets.router_logits)]
    terms = _MoETerms(ctx, targets.weights)
    moe = ctx.adapter.is_moe_block(ctx.i)

    def block_loss(W_hat, batch):
        hidden, kw, target, fp_logits = batch
        params = {f"{ctx.rel(n)}.weight": W for n, W in W_hat.items()}
        with terms:
            out = functional_call(block, params, (hidden,), kw)
            out = out[0] if isinstance(out, tuple) else out  # (b, T, H)
            t = target.float()
            loss = (out.float() - t).pow(2).sum() / t.pow(2).sum()
            if moe and knobs.router:
                loss = loss + knobs.router * terms.router_kl(fp_logits)
            if moe and knobs.expert and terms.norm > 0:
                loss = loss + knobs.expert * terms.err / terms.norm
        return loss

    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # only the tuner's offsets and scale factors learn
    try:
        tuned, info = tune_block({n: solved.results[n] for n in names}, batches, block_loss, knobs, ctx.device,
                                 storage_dtype)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    rows = {n: solved.rows[n] for n in names}
    _write_back(ctx, {n: (r, {}) for n, r in tuned.items()}, solved, storage_dtype)
    block_loss_row = {"start": info["loss_start"], "end": info["loss_end"], "kept": info["kept"]}
    for n in names:  # keep the solve stage's row facts, add what the tuner did
        solved.rows[n] = {**rows[n], **solved.rows[n], "tuned_moved": tuned[n].info.get("tuned_moved", 0),
                          "tune_block_loss": block_loss_row}
    return {"block": ctx.i, **info}
