"""MoE mechanics, generic over :class:`~moeq.models.registry.MoESpec`: the per-expert view.

transformers v5 stores the routed experts of a layer as two fused 3-D parameters,
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I). Quantizers work on 2-D linears, so moeq
swaps that module for an :class:`ExpertSet`: an ``nn.ModuleList`` of per-expert MLPs with real
``nn.Linear`` gate/up/down projections, whose ``forward(hidden, top_k_index, top_k_weights)`` is the
same computation as the fused module (tested to fp32 allclose). :func:`refuse_experts` writes the
per-expert weights back into the fused layout for the model's own (faster) forward and for
``save_pretrained``. Remote-code checkpoints that already hold an ``nn.ModuleList`` of experts are
wrapped the same way, so every later stage sees one layout.

The ExpertSet is also where calibration sees routing: before an expert runs it sets
``expert.moeq_routing`` to a :class:`RoutedCall` (which token rows it got and the combine weight c
of each), so statistics hooks pair every input row with its token index and coefficient. With
``coverage_all`` on, every expert runs on every token (for statistics only) while the output still
combines the routed tokens alone, so downstream activations stay faithful.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RoutedCall:
    """What one expert is given in one forward: rows of the layer input and their coefficients."""

    token_idx: torch.Tensor  # (n,) indices into the flattened tokens of the layer input
    weight: torch.Tensor  # (n,) combine weight c of this expert for each row (0 for non-routed rows)
    routed: torch.Tensor  # (n,) bool, True where the token was routed to this expert


class ExpertMLP(nn.Module):
    """One routed expert as three real linears: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, act_fn, names=("gate_proj", "up_proj", "down_proj"), dtype=None):
        super().__init__()
        self.names = names
        for n, (i, o) in zip(names, ((hidden, inter), (hidden, inter), (inter, hidden))):
            setattr(self, n, nn.Linear(i, o, bias=False, dtype=dtype))
        self.act_fn = act_fn
        self.moeq_routing: RoutedCall | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, H) -> (n, H)
        g, u, d = (getattr(self, n) for n in self.names)
        return d(self.act_fn(g(x)) * u(x))


class ExpertSet(nn.ModuleList):
    """Per-expert view of a layer's routed experts with the v5 experts-module call signature."""

    def __init__(self, experts, source: nn.Module | None = None):
        super().__init__(experts)
        self.source = [source]  # the fused module it replaced (kept out of the module tree)
        self.coverage_all = False

    @property
    def num_experts(self) -> int:
        return len(self)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # hidden_states (N, H); top_k_index (N, k) long; top_k_weights (N, k)
        N, k = top_k_index.shape
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
            if n == 0 and not self.coverage_all:
                continue
            if self.coverage_all:
                # statistics see every token; only routed rows are combined
                full_w = torch.zeros(N, dtype=w.dtype, device=w.device)
                full_w[tok] = w
                routed = torch.zeros(N, dtype=torch.bool, device=w.device)
                routed[tok] = True
                expert.moeq_routing = RoutedCall(torch.arange(N, device=w.device), full_w, routed)
                y = expert(hidden_states)[tok]  # (n, H)
            else:
                expert.moeq_routing = RoutedCall(tok, w, torch.ones_like(tok, dtype=torch.bool))
                y = expert(hidden_states[tok])  # (n, H)
            expert.moeq_routing = None
            ys[sl] = y * w[:, None].to(y.dtype)
        out = torch.zeros_like(hidden_states)  # (N, H)
        # one scatter-add for the whole layer; each token's k terms arrive in expert order, as in HF
        return out.index_add_(0, tok_all, ys.to(out.dtype))


def unfuse_fused_experts(fused: nn.Module, names=("gate_proj", "up_proj", "down_proj")) -> ExpertSet:
    """Build an ExpertSet from a v5 fused experts module (gate_up_proj (E,2I,H), down_proj (E,H,I))."""
    gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
    E, two_i, H = gate_up.shape
    inter = two_i // 2
    experts = []
    for e in range(E):
        ex = ExpertMLP(H, inter, fused.act_fn, names, dtype=gate_up.dtype)
        getattr(ex, names[0]).weight.data = gate_up[e, :inter].clone()  # (I, H)
        getattr(ex, names[1]).weight.data = gate_up[e, inter:].clone()  # (I, H)
        getattr(ex, names[2]).weight.data = down[e].clone()  # (H, I)
        experts.append(ex)
    # the per-expert copies now hold the weights: free the fused storage (refuse restacks them)
    fused.gate_up_proj.data = gate_up.new_empty(0)
    fused.down_proj.data = down.new_empty(0)
    return ExpertSet(experts, source=fused)


def refuse_expert_set(es: ExpertSet) -> nn.Module:
    """Write the per-expert weights back into the fused module the set was built from."""
    fused = es.source[0]
    g, u, d = es[0].names
    gate_up = torch.stack([torch.cat([getattr(ex, g).weight.data, getattr(ex, u).weight.data], 0) for ex in es])
    down = torch.stack([getattr(ex, d).weight.data for ex in es])
    fused.gate_up_proj.data = gate_up.to(fused.gate_up_proj.dtype)  # (E, 2I, H)
    fused.down_proj.data = down.to(fused.down_proj.dtype)  # (E, H, I)
    return fused


def wrap_module_list(experts: nn.ModuleList) -> ExpertSet:
    """Wrap remote-code per-expert modules (already real linears) in an ExpertSet."""
    for ex in experts:
        ex.moeq_routing = None
    return ExpertSet(list(experts), source=None)
