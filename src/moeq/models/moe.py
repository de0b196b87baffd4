"""MoE mechanics, generic over :class:`~moeq.models.registry.MoESpec`: the per-expert view and routing taps.

transformers v5 stores the routed experts of a layer as two fused 3-D parameters,
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I). Quantizers work on 2-D linears, so moeq
swaps that module for an :class:`ExpertSet`: an ``nn.ModuleList`` of per-expert MLPs with real
``nn.Linear`` gate/up/down projections, whose ``forward(hidden, top_k_index, top_k_weights)`` is the
same computation as the fused module (tested to fp32 allclose). :func:`refuse_expert_set` writes the
per-expert weights back into the fused layout for the model's own (faster) forward. Remote-code
checkpoints that already hold an ``nn.ModuleList`` of experts are wrapped the same way, so every later
stage sees one layout. An ExpertSet can be built on the meta device (no memory) and filled expert by
expert from a checkpoint (:mod:`moeq.models.lazy`).

Routing is observed, never stored on modules: while a :class:`RoutingObserver` is attached (by
``ModelAdapter.routing``), the ExpertSet tells it which token rows each expert gets and the combine
weight c of each (:class:`RoutedCall`), and, with ``coverage_all``, runs every expert on every token
for statistics while the output still combines the routed tokens alone. :class:`RoutingTap` is the
one place that records what the routers chose (top-k indices and weights) for usage, fidelity and EBSS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class RoutedCall:
    """What one expert is given in one forward: rows of the layer input and their coefficients."""

    token_idx: torch.Tensor  # (n,) indices into the flattened tokens of the layer input
    weight: torch.Tensor  # (n,) combine weight c of this expert for each row (0 for non-routed rows)
    routed: torch.Tensor  # (n,) bool, True where the token was routed to this expert


@dataclass
class RoutingObserver:
    """The calls of the current forward, keyed by the full name of the expert (or shared expert) module."""

    coverage_all: bool = False  # every expert computes every token (statistics only)
    calls: dict[str, RoutedCall] = field(default_factory=dict)

    def call(self, parent: str) -> RoutedCall | None:
        return self.calls.get(parent)


class ExpertMLP(nn.Module):
    """One routed expert as three real linears: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, act_fn, names=("gate_proj", "up_proj", "down_proj"), dtype=None,
                 device=None):
        super().__init__()
        self.names = names
        for n, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden))):
            setattr(self, n, nn.Linear(i, o, bias=False, dtype=dtype, device=device))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, H) -> (n, H)
        g, u, d = (getattr(self, n) for n in self.names)
        return d(self.act_fn(g(x)) * u(x))


class ExpertSet(nn.ModuleList):
    """Per-expert view of a layer's routed experts with the v5 experts-module call signature.

    ``names[e]`` is the full module name of expert e (set by the adapter) so an attached observer can
    key its calls; ``source`` is the fused module it replaced (kept out of the module tree)."""

    def __init__(self, experts, source: nn.Module | None = None):
        super().__init__(experts)
        self.source = [source]
        self.names: list[str] = [str(e) for e in range(len(self))]
        self.observer: RoutingObserver | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # hidden_states (N, H); top_k_index (N, k) long; top_k_weights (N, k)
        N, k = top_k_index.shape
        obs = self.observer
        every = obs is not None and obs.coverage_all
        flat = top_k_index.reshape(-1)  # (N*k,) slot s = token * k + j
        order = torch.argsort(flat, stable=True)  # slots grouped by expert, token order kept
        counts = torch.bincount(flat, minlength=len(self)).tolist()
        tok_all = order // k  # (N*k,)
        w_all = top_k_weights.reshape(-1)[order]  # (N*k,) combine weight of each sorted slot
        ys = hidden_states.new_zeros(N * k, hidden_states.shape[-1])  # weighted outputs, sorted slot order
        start = 0
        for e, expert in enumerate(self):
            n = counts[e] if e < len(counts) else 0
            sl = slice(start, start + n)
            tok, w = tok_all[sl], w_all[sl]  # (n,)
            start += n
            if n == 0 and not every:
                continue
            if every:  # statistics see every token; only routed rows are combined
                full_w = torch.zeros(N, dtype=w.dtype, device=w.device).index_copy_(0, tok, w)  # (N,)
                routed = torch.zeros(N, dtype=torch.bool, device=w.device).index_fill_(0, tok, True)
                obs.calls[self.names[e]] = RoutedCall(torch.arange(N, device=w.device), full_w, routed)
                y = expert(hidden_states)[tok]  # (n, H)
            else:
                if obs is not None:
                    obs.calls[self.names[e]] = RoutedCall(tok, w, torch.ones_like(tok, dtype=torch.bool))
                y = expert(hidden_states[tok])  # (n, H)
            ys[sl] = y * w[:, None].to(y.dtype)
        if obs is not None:
            for name in self.names:
                obs.calls.pop(name, None)
        out = torch.zeros_like(hidden_states)  # (N, H)
        # one scatter-add for the whole layer; each token's k terms arrive in expert order, as in HF
        return out.index_add_(0, tok_all, ys.to(out.dtype))


def unfuse_fused_experts(fused: nn.Module, names=("gate_proj", "up_proj", "down_proj")) -> ExpertSet:
    """Build an ExpertSet from a v5 fused experts module (gate_up_proj (E,2I,H), down_proj (E,H,I)).
    On the meta device this allocates nothing."""
    gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
    E, two_i, H = gate_up.shape
    inter = two_i // 2
    experts = []
    for e in range(E):
        ex = ExpertMLP(H, inter, fused.act_fn, names, dtype=gate_up.dtype, device="meta")
        for n, w in zip(names, (gate_up[e, :inter], gate_up[e, inter:], down[e])):  # (I, H), (I, H), (H, I)
            getattr(ex, n).weight = nn.Parameter(w.clone(), requires_grad=False)
        experts.append(ex)
    # the per-expert copies now hold the weights: free the fused storage (refuse restacks them)
    fused.gate_up_proj = nn.Parameter(gate_up.new_empty(0, device="meta"), requires_grad=False)
    fused.down_proj = nn.Parameter(down.new_empty(0, device="meta"), requires_grad=False)
    return ExpertSet(experts, source=fused)


def refuse_expert_set(es: ExpertSet) -> nn.Module:
    """Write the per-expert weights back into the fused module the set was built from."""
    fused = es.source[0]
    g, u, d = es[0].names
    gate_up = torch.stack([torch.cat([getattr(ex, g).weight.data, getattr(ex, u).weight.data], 0) for ex in es])
    down = torch.stack([getattr(ex, d).weight.data for ex in es])
    fused.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)  # (E, 2I, H)
    fused.down_proj = nn.Parameter(down, requires_grad=False)  # (E, H, I)
    return fused


def wrap_module_list(experts: nn.ModuleList) -> ExpertSet:
    """Wrap remote-code per-expert modules (already real linears) in an ExpertSet."""
    return ExpertSet(list(experts), source=None)


class RoutingTap:
    """Forward pre-hooks on the experts module of every MoE block: what the router chose per block.

    ``last[i]`` = (top_k_index (N, k), top_k_weights (N, k)) of block i's most recent forward (on the
    device); ``on_route(i, idx, w)``, when given, is called on every forward. Works for fused and
    per-expert layouts alike (both take ``(hidden, top_k_index, top_k_weights)``). Use as a context."""

    def __init__(self, adapter, on_route=None):
        self.adapter, self.on_route = adapter, on_route
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []

    def _hook(self, i):
        def hook(mod, args):
            self.last[i] = (args[1], args[2])
            if self.on_route is not None:
                self.on_route(i, args[1], args[2])
        return hook

    def __enter__(self) -> "RoutingTap":
        ad = self.adapter
        if ad.spec.moe is not None and ad.spec.moe.layout == "modulelist":
            ad.unfuse()  # remote-code blocks call their experts one by one; only the ExpertSet sees the routing
        self._handles = [ad.experts(i).register_forward_pre_hook(self._hook(i)) for i in ad.moe_blocks()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
