"""Where the function-preserving transforms act, read from the registry (no architecture branches).

Every decoder block has two residual-stream readers behind a norm (attention inputs behind
``input_norm``; router, shared-expert gate, every expert's and shared expert's gate/up, or the dense
MLP's gate/up behind ``post_attn_norm``), residual-stream writers (``attn_output`` and every down
projection), and linear -> linear pairs whose channels line up one to one (``value_out``; up -> down
inside each expert). Paths are block-relative; the per-expert view must be active (``adapter.per_expert()``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models.adapter import ModelAdapter, get_submodule
from ..models.moe import ExpertSet


@dataclass(frozen=True)
class NormSite:
    """A norm and the modules that read its output. ``quantized`` ones are smoothed/quantized;
    ``full_precision`` ones (routers, shared-expert gates) read the same input and only get compensated."""

    norm: str
    quantized: tuple[str, ...]
    full_precision: tuple[str, ...] = ()
    inspect: str | None = None  # module whose output an AWQ search compares (None: the linears themselves)


@dataclass(frozen=True)
class LinearPair:
    """prev's output channels are next's input channels (scaling one by 1/s and the other by s is exact)."""

    prev: str
    next: str


def _exists(block: nn.Module, paths) -> tuple[str, ...]:
    return tuple(p for p in paths if get_submodule(block, p) is not None)


def _mlp_parts(adapter: ModelAdapter, i: int) -> list[str]:
    """Block-relative prefixes of every gated MLP of block i: each routed expert, shared expert, dense MLP."""
    spec, block = adapter.spec, adapter.blocks[i]
    if adapter.is_moe_block(i):
        es = adapter.experts(i)
        if not isinstance(es, ExpertSet):
            raise RuntimeError("experts are still fused: use the per-expert view (adapter.per_expert())")
        parts = [f"{spec.moe.experts}.{e}" for e in range(len(es))]
        if spec.moe.shared_experts and adapter.shared_expert(i) is not None:
            parts.append(spec.moe.shared_experts)
        return parts
    return [spec.dense_mlp] if get_submodule(block, spec.dense_mlp) is not None else []


def _proj_names(adapter: ModelAdapter, i: int, part: str) -> tuple[str, str, str]:
    moe = adapter.spec.moe
    if moe is not None and adapter.is_moe_block(i) and part.startswith(f"{moe.experts}."):
        return moe.proj_names
    return adapter.spec.mlp_proj_names


def attn_inputs(adapter: ModelAdapter, i: int) -> tuple[str, ...]:
    spec = adapter.spec
    return _exists(adapter.blocks[i], spec.attn_inputs or spec.attn_groups[0])


def norm_sites(adapter: ModelAdapter, i: int) -> list[NormSite]:
    """The residual readers of block i, grouped by the norm in front of them."""
    spec, block = adapter.spec, adapter.blocks[i]
    sites = [NormSite(spec.input_norm, attn_inputs(adapter, i), inspect=spec.attn_module)]
    gate_up = []
    for part in _mlp_parts(adapter, i):
        g, u, _ = _proj_names(adapter, i, part)
        gate_up += [f"{part}.{g}", f"{part}.{u}"]
    fp: tuple[str, ...] = ()
    inspect = spec.dense_mlp
    if adapter.is_moe_block(i):
        moe = spec.moe
        fp = _exists(block, [moe.router] + ([moe.shared_gate] if moe.shared_gate else []))
        inspect = moe.experts.rpartition(".")[0]
    sites.append(NormSite(spec.post_attn_norm, _exists(block, gate_up), fp, inspect))
    return sites


def inner_norm_sites(adapter: ModelAdapter, i: int) -> list[NormSite]:
    """Norms inside attention (e.g. MLA's q_a/kv_a layernorms) that feed one linear each."""
    block = adapter.blocks[i]
    return [NormSite(n, _exists(block, lins)) for n, lins in adapter.spec.inner_norms
            if get_submodule(block, n) is not None and _exists(block, lins)]


def residual_writers(adapter: ModelAdapter, i: int) -> tuple[str, ...]:
    """Linears whose output is added to the residual stream: attention output and every down projection."""
    downs = [f"{p}.{_proj_names(adapter, i, p)[2]}" for p in _mlp_parts(adapter, i)]
    return _exists(adapter.blocks[i], [adapter.spec.attn_output] + downs)


def up_down_pairs(adapter: ModelAdapter, i: int) -> list[LinearPair]:
    out = []
    for p in _mlp_parts(adapter, i):
        _, u, d = _proj_names(adapter, i, p)
        out.append(LinearPair(f"{p}.{u}", f"{p}.{d}"))
    return out


def value_out_pair(adapter: ModelAdapter, i: int) -> LinearPair | None:
    """(v, o) when v's output width equals o's input width (no grouped-query sharing, no MLA)."""
    vo = adapter.spec.value_out
    if vo is None:
        return None
    v, o = (get_submodule(adapter.blocks[i], p) for p in vo)
    if not isinstance(v, nn.Linear) or not isinstance(o, nn.Linear) or v.out_features != o.in_features:
        return None
    return LinearPair(*vo)


def head_dim(adapter: ModelAdapter) -> int:
    cfg = adapter.config
    hd = getattr(cfg, adapter.spec.head_dim_attr, None)
    return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads
