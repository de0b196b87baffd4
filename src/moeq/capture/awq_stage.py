"""AWQ (and MoEQuant+) as a stage of the one block loop: record, search, apply, clip.

For block i, before its linears are solved:
1. one pass over the calibration batches records the inputs and outputs the searches inspect;
2. for every (previous op -> readers) site from the registry, :func:`moeq.solvers.awq.search_scale`
   picks a scale, which :func:`moeq.transforms.smooth.apply_smooth` folds into the weights (exact in
   full precision); sites, in order: input norm -> attention inputs (inspect: attention output),
   v -> o, inner norms (MLA), post-attention norm -> every expert's and shared expert's gate/up
   (one scale; router and shared-expert gate compensated in full precision; inspect: MoE block
   output), up -> down in each expert / shared expert / dense MLP;
3. a second pass records sampled input rows of every quantized linear, and
   :func:`moeq.solvers.awq.search_clip` picks per-(row, group) clip factors (q/k-like linears
   excepted, as in llm-awq). The block loop then rounds every linear to nearest with those clips.

With ``affinity`` (MoEQuant+), expert rows carry their routing coefficient c: the MLP statistic is
sum_e sum_i c_ie |x_i| / sum c, the MLP loss is sum_e sum_i c_ie ||E_e(x_i) - E^_e(x_i)||^2 (each expert
on its own routed rows, plus the shared expert with its gate value) instead of the MoE block's output
error, and up -> down and clip losses weight rows by c.

The stage returns what it found (:class:`SearchResult`: scales, clips, routed tokens); the scales are
already folded into the block, the clips are what the solve stage's RTN uses.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from ..config import AWQKnobs
from ..models.adapter import get_submodule
from ..quant.primitives import QuantArgs
from ..solvers.awq import channel_mean, hessian_error, row_hessian, search_clip, search_scale, weighted_sq_error
from ..transforms.sites import NormSite, inner_norm_sites, norm_sites, up_down_pairs, value_out_pair
from ..transforms.smooth import SmoothScale, apply_smooth
from .loop import BlockContext, SearchResult
from .recorder import Recorder


def _rel(path: str, root: str) -> str:
    return path[len(root) + 1:] if root else path


def _io_loss(mod, root: str, calls):
    """Loss of substituted weights = squared error of ``mod``'s output over the recorded calls."""
    def loss(W_hat: dict[str, torch.Tensor]) -> float:
        params = {f"{_rel(n, root)}.weight": W for n, W in W_hat.items()}
        tot = den = 0.0
        for args, kw, out, _ in calls:
            y = functional_call(mod, params, args, kw)
            a, b = weighted_sq_error(y[0] if isinstance(y, tuple) else y, out)
            tot, den = tot + a, den + b
        return tot / max(den, 1e-12)
    return loss


def _rows_loss(X: torch.Tensor, c, weights: dict[str, torch.Tensor]):
    """Loss of substituted weights on recorded input rows X (n, d): sum_j sum_i c_i ||x_i (W_hat_j - W_j)^T||^2 / sum c,
    computed as sum_j tr(D_j H D_j^T) with H = sum_i c_i x_i x_i^T / sum c formed once (d, d)."""
    H = row_hessian(X, c)  # (d, d)

    def loss(W_hat):
        return sum(hessian_error(W_hat[n] - W.float(), H) for n, W in weights.items())
    return loss


def _affinity_mlp_loss(block, parts: list[str], rec: Recorder):
    """sum over experts (and shared expert) of c-weighted output errors on their own routed rows."""
    def loss(W_hat):
        tot = den = 0.0
        for part in parts:
            mod = get_submodule(block, part)
            params = {f"{_rel(n, part)}.weight": W for n, W in W_hat.items() if n.startswith(part + ".")}
            for args, kw, out, c in rec.calls.get(part, []):
                a, b = weighted_sq_error(functional_call(mod, params, args, kw), out, c)
                tot, den = tot + a, den + b
        return tot / max(den, 1e-12)
    return loss


class _AWQ:
    """The searches of one block (state lives for one block only)."""

    def __init__(self, ctx: BlockContext, plan: dict[str, QuantArgs | None], k: AWQKnobs, affinity: bool,
                 scale_dtype, skip_next):
        self.ctx, self.plan, self.k, self.affinity, self.scale_dtype = ctx, plan, k, affinity, scale_dtype
        self.skip_next = skip_next  # full names of linears whose input gets an online Hadamard (no x/s there)
        self.out = SearchResult()

    def _args_of(self, rel: str) -> QuantArgs | None:
        return self.plan.get(f"{self.ctx.name}.{rel}")

    def _search(self, prev, quantized, fp, x_mean, loss):
        block = self.ctx.block
        weights = {p: get_submodule(block, p).weight.data for p in quantized}
        if not weights or x_mean.numel() == 0:
            return
        s, info = search_scale(x_mean, weights, self._args_of, loss, self.k.grid, self.scale_dtype)
        apply_smooth(block, prev, tuple(quantized) + tuple(fp), s)
        self.out.scales.append(SmoothScale(self.ctx.i, prev, tuple(quantized) + tuple(fp), s.cpu(), info))

    @torch.no_grad()
    def run(self) -> SearchResult:
        ctx = self.ctx
        adapter, i, block, spec = ctx.adapter, ctx.i, ctx.block, ctx.adapter.spec
        attn_site, mlp_site = norm_sites(adapter, i)
        all_pairs = up_down_pairs(adapter, i)
        pairs = [p for p in all_pairs if f"{ctx.name}.{p.next}" not in self.skip_next]
        vo = value_out_pair(adapter, i)
        inner = inner_norm_sites(adapter, i)
        mlp_parts = [p.prev.rpartition(".")[0] for p in all_pairs]
        moe = adapter.is_moe_block(i)

        # ---- pass 1: everything the scale searches look at (all transforms are exact, so one pass serves all)
        with adapter.routing(i) as r, Recorder(r) as rec:
            rec.io("attn", get_submodule(block, spec.attn_module))
            if self.affinity and moe:  # per-expert rows, outputs and coefficients
                for part in mlp_parts:
                    rec.io(part, get_submodule(block, part), f"{ctx.name}.{part}")
            elif mlp_site.inspect and get_submodule(block, mlp_site.inspect) is not None:
                rec.io("mlp", get_submodule(block, mlp_site.inspect))  # the whole MoE block / dense MLP
            lin_sites = ([vo.next] if vo else []) + [l for s in inner for l in s.quantized] + [p.next for p in pairs]
            for path in lin_sites:
                rec.rows(path, get_submodule(block, path), f"{ctx.name}.{path.rpartition('.')[0]}")
            ctx.forward()
        if moe:  # routed tokens per expert, for the report
            for p in pairs:
                part = p.prev.rpartition(".")[0]
                if part.startswith(spec.moe.experts + "."):
                    n = rec.rows_of(p.next)[0].shape[0]
                    self.out.tokens.update({f"{ctx.name}.{part}.{q}": n for q in spec.moe.proj_names})

        # ---- searches, applied as they are found
        attn_calls = rec.calls["attn"]
        x_attn = channel_mean([a[0] if a else kw["hidden_states"] for a, kw, _, _ in attn_calls])
        self._search(attn_site.norm, attn_site.quantized, (), x_attn,
                     _io_loss(get_submodule(block, spec.attn_module), spec.attn_module, attn_calls))
        if vo is not None:
            X, c = rec.rows_of(vo.next)
            self._search(vo.prev, (vo.next,), (), channel_mean([X]),
                         _rows_loss(X, None, {vo.next: get_submodule(block, vo.next).weight.data}))
        for site in inner:
            X, _ = rec.rows_of(site.quantized[0])
            ws = {p: get_submodule(block, p).weight.data for p in site.quantized}
            self._search(site.norm, site.quantized, (), channel_mean([X]), _rows_loss(X, None, ws))
        self._mlp_search(mlp_site, mlp_parts, rec)
        for p in pairs:
            X, c = rec.rows_of(p.next)
            c = c if self.affinity else None
            if X.shape[0] == 0:
                continue  # an expert no calibration token reached keeps s = 1
            W = {p.next: get_submodule(block, p.next).weight.data}
            self._search(p.prev, (p.next,), (), channel_mean([X], [c]), _rows_loss(X, c, W))
        del rec
        if self.k.clip:
            self.out.clips = self._clips()
        return self.out

    def _mlp_search(self, site: NormSite, parts, rec):
        if not site.quantized:
            return
        block = self.ctx.block
        if self.affinity and self.ctx.adapter.is_moe_block(self.ctx.i):
            rows, cs = [], []
            for part in parts:
                for args, _, _, c in rec.calls.get(part, []):
                    rows.append(args[0])
                    cs.append(c if c is not None else torch.ones(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
            x_mean, loss = channel_mean(rows, cs), _affinity_mlp_loss(block, parts, rec)
        else:
            calls = rec.calls["mlp"]
            x_mean = channel_mean([a[0] if a else kw["hidden_states"] for a, kw, _, _ in calls])
            loss = _io_loss(get_submodule(block, site.inspect), site.inspect, calls)
        self._search(site.norm, site.quantized, site.full_precision, x_mean, loss)

    def _clips(self) -> dict:
        """Pass 2 on the smoothed block: clip factors for every quantized linear but the q/k-like ones."""
        ctx = self.ctx
        adapter, i = ctx.adapter, ctx.i
        n_tokens = ctx.acts.num_tokens
        stride = max(1, n_tokens // max(1, self.k.clip_tokens))
        e_stride = max(1, stride * adapter.top_k // max(1, adapter.num_experts)) if adapter.is_moe_block(i) else stride
        todo = {}
        for li in adapter.block_linears(i):
            rel = ctx.rel(li.name)
            if rel in adapter.spec.qk_linears or self.plan.get(li.name) is None:
                continue
            todo[li.name] = (rel, li.role == "expert")
        with adapter.routing(i) as r, Recorder(r) as rec:
            for name, (rel, expert) in todo.items():
                rec.rows(rel, get_submodule(ctx.block, rel), name.rpartition(".")[0], e_stride if expert else stride)
            ctx.forward()
        clips = {}
        for name, (rel, _) in todo.items():
            X, c = rec.rows_of(rel)
            if X.shape[0] == 0:
                continue
            p = search_clip(get_submodule(ctx.block, rel).weight.data, X, self.plan[name],
                            c if self.affinity else None, self.k.clip_grid, self.k.clip_max_shrink, self.scale_dtype)
            clips[name] = (p, p)
        return clips


def awq_block(ctx: BlockContext, plan: dict[str, QuantArgs | None], knobs: AWQKnobs, affinity: bool = False,
              scale_dtype=None, skip_next=frozenset()) -> SearchResult:
    """AWQ's searches on block ``ctx.i`` (module docstring); scales are applied to the block in place."""
    return _AWQ(ctx, plan, knobs, affinity, scale_dtype, skip_next).run()
