"""Bind an :class:`ArchSpec` to a loaded model: blocks, linears, experts, true-sequential groups.

The adapter is the one object the rest of moeq asks "what is where". It resolves the spec's
paths on a concrete model (skipping paths this config variant lacks), swaps fused experts for
the per-expert :class:`~moeq.models.moe.ExpertSet` view (``unfuse``) and back (``refuse``), and
names every quantizable linear by its full module name, e.g.
``model.layers.3.mlp.experts.7.down_proj``. Names of linears are stable across unfuse/refuse.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .moe import ExpertSet, RoutedCall, RoutingObserver, refuse_expert_set, unfuse_fused_experts, wrap_module_list
from .registry import ArchSpec, get_spec


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.<path>`` or None when any part is missing."""
    mod = root
    for part in path.split("."):
        if part.isdigit() and isinstance(mod, (nn.ModuleList, nn.Sequential)):
            idx = int(part)
            mod = mod[idx] if idx < len(mod) else None
        else:
            mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(get_submodule(root, parent) if parent else root, leaf, new)


@dataclass(frozen=True)
class LinearInfo:
    """One quantizable linear: where it is and what it is."""

    name: str  # full module name
    block: int
    role: str  # "attn" | "expert" | "shared" | "dense_mlp"
    expert: int | None  # routed expert index within its layer
    proj: str  # last name component, e.g. "q_proj", "gate_proj"


class ModelAdapter:
    """A spec bound to a model. Construct with :meth:`for_model`."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self.model, self.spec = model, spec
        self.config = model.config
        blocks = get_submodule(model, spec.blocks)
        if blocks is None:
            raise ValueError(f"{spec.name}: model has no {spec.blocks!r}; its layout does not match the registry spec")
        self.blocks: nn.ModuleList = blocks

    @classmethod
    def for_model(cls, model: nn.Module) -> "ModelAdapter":
        return cls(model, get_spec(model.config.model_type))

    # ------------------------------------------------------------------ config facts
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_experts(self) -> int:
        return int(getattr(self.config, self.spec.moe.num_experts_attr)) if self.spec.moe else 0

    @property
    def top_k(self) -> int:
        return int(getattr(self.config, self.spec.moe.top_k_attr)) if self.spec.moe else 0

    def block_name(self, i: int) -> str:
        return f"{self.spec.blocks}.{i}"

    # ------------------------------------------------------------------ MoE parts of a block
    def is_moe_block(self, i: int) -> bool:
        return self.spec.moe is not None and get_submodule(self.blocks[i], self.spec.moe.experts) is not None

    def moe_blocks(self) -> list[int]:
        return [i for i in range(self.num_blocks) if self.is_moe_block(i)]

    def experts(self, i: int) -> nn.Module | None:
        return get_submodule(self.blocks[i], self.spec.moe.experts) if self.is_moe_block(i) else None

    def router(self, i: int) -> nn.Module | None:
        return get_submodule(self.blocks[i], self.spec.moe.router) if self.is_moe_block(i) else None

    def shared_expert(self, i: int) -> nn.Module | None:
        moe = self.spec.moe
        return get_submodule(self.blocks[i], moe.shared_experts) if moe and moe.shared_experts else None

    def shared_gate(self, i: int) -> nn.Module | None:
        moe = self.spec.moe
        return get_submodule(self.blocks[i], moe.shared_gate) if moe and moe.shared_gate else None

    def moe_module(self, i: int) -> nn.Module | None:
        """The whole MoE block (parent of router and experts)."""
        return get_submodule(self.blocks[i], self.spec.moe.experts.rpartition(".")[0]) if self.is_moe_block(i) else None

    # ------------------------------------------------------------------ per-expert view
    @property
    def is_unfused(self) -> bool:
        return all(isinstance(self.experts(i), ExpertSet) for i in self.moe_blocks())

    def unfuse_block(self, i: int) -> None:
        """Swap block i's experts for the per-expert ExpertSet view (idempotent; free on the meta device)."""
        moe = self.spec.moe
        ex = self.experts(i)
        if ex is None or isinstance(ex, ExpertSet):
            return
        es = unfuse_fused_experts(ex, moe.proj_names) if moe.layout == "fused" else wrap_module_list(ex)
        es.names = [f"{self.block_name(i)}.{moe.experts}.{e}" for e in range(len(es))]
        set_submodule(self.blocks[i], moe.experts, es)
        if moe.dispatch:  # remote-code blocks call e.g. self.moe_infer(x, idx, w): route it through the set
            setattr(self.moe_module(i), moe.dispatch, es.forward)

    def refuse_block(self, i: int) -> None:
        """Write block i's per-expert weights back into its fused parameters (module-list layouts stay)."""
        es = self.experts(i)
        if isinstance(es, ExpertSet) and es.source[0] is not None:
            set_submodule(self.blocks[i], self.spec.moe.experts, refuse_expert_set(es))

    def unfuse(self) -> "ModelAdapter":
        for i in self.moe_blocks():
            self.unfuse_block(i)
        return self

    def refuse(self) -> "ModelAdapter":
        for i in self.moe_blocks():
            self.refuse_block(i)
        return self

    @contextmanager
    def per_expert(self):
        """The per-expert view for the duration of the block; the model's own layout is restored after."""
        was = self.is_unfused
        self.unfuse()
        try:
            yield self
        finally:
            if not was:
                self.refuse()

    # ------------------------------------------------------------------ routing
    def routing_parents(self, i: int) -> dict[str, nn.Module]:
        """Full name -> module of every module whose linears see routed rows (experts, shared expert)."""
        out = {}
        es = self.experts(i)
        if isinstance(es, ExpertSet):
            out.update(dict(zip(es.names, es)))
        shared = self.shared_expert(i)
        if shared is not None:
            out[f"{self.block_name(i)}.{self.spec.moe.shared_experts}"] = shared
        return out

    @contextmanager
    def routing(self, i: int, coverage_all: bool = False):
        """Observe block i's routing: ``with adapter.routing(i) as r: ...; r.call(expert_name)`` is the
        RoutedCall of that expert in the current forward. The shared expert gets c = its gate's coefficient
        per token (registry ``shared_combine``: sigmoid(shared_gate(x)), or 1 where the model applies none).
        With ``coverage_all`` every expert computes every token (statistics only; outputs stay routed)."""
        obs = RoutingObserver(coverage_all)
        es = self.experts(i)
        if es is not None and not isinstance(es, ExpertSet):
            raise RuntimeError("experts are still fused: use the per-expert view (adapter.per_expert())")
        handles = []
        shared = self.shared_expert(i)
        if shared is not None:
            name = f"{self.block_name(i)}.{self.spec.moe.shared_experts}"
            gate = self.shared_gate(i) if self.spec.moe.shared_combine == "sigmoid_gate" else None

            def hook(mod, args):
                x = args[0].reshape(-1, args[0].shape[-1])  # (N, H)
                c = torch.sigmoid(gate(x)).reshape(-1) if gate is not None else torch.ones(x.shape[0], device=x.device)
                obs.calls[name] = RoutedCall(torch.arange(x.shape[0], device=x.device), c,
                                             torch.ones_like(c, dtype=torch.bool))
            handles.append(shared.register_forward_pre_hook(hook))
        if es is not None:
            es.observer = obs
        try:
            yield obs
        finally:
            for h in handles:
                h.remove()
            if es is not None:
                es.observer = None

    # ------------------------------------------------------------------ linears and groups
    def _existing(self, i: int, paths) -> list[str]:
        return [p for p in paths if isinstance(get_submodule(self.blocks[i], p), nn.Linear)]

    def _mlp_paths(self, i: int) -> tuple[list[str], list[str], list[tuple[str, str, int | None]]]:
        """(gate/up paths, down paths, [(path, role, expert)]) of the block's MLP side."""
        g, u, d = self.spec.mlp_proj_names
        gate_up, down, info = [], [], []
        if self.is_moe_block(i):
            moe = self.spec.moe
            es = self.experts(i)  # names are the same in the fused and the per-expert view
            eg, eu, ed = moe.proj_names
            for e in range(len(es) if isinstance(es, ExpertSet) else es.gate_up_proj.shape[0]):
                base = f"{moe.experts}.{e}"
                gate_up += [f"{base}.{eg}", f"{base}.{eu}"]
                down.append(f"{base}.{ed}")
                info += [(f"{base}.{p}", "expert", e) for p in (eg, eu, ed)]
            if moe.shared_experts and self.shared_expert(i) is not None:
                base = moe.shared_experts
                gate_up += [f"{base}.{g}", f"{base}.{u}"]
                down.append(f"{base}.{d}")
                info += [(f"{base}.{p}", "shared", None) for p in (g, u, d)]
        else:
            base = self.spec.dense_mlp
            paths = self._existing(i, [f"{base}.{g}", f"{base}.{u}", f"{base}.{d}"])
            gate_up += [p for p in paths if not p.endswith(f".{d}")]
            down += [p for p in paths if p.endswith(f".{d}")]
            info += [(p, "dense_mlp", None) for p in paths]
        return gate_up, down, info

    def groups(self, i: int) -> list[list[str]]:
        """True-sequential groups of block ``i`` (block-relative names), in execution order:
        attention groups, then every expert's (and shared/dense MLP's) gate+up, then every down."""
        out = [g for g in (self._existing(i, grp) for grp in self.spec.attn_groups) if g]
        gate_up, down, _ = self._mlp_paths(i)
        return out + [g for g in (gate_up, down) if g]

    def block_linears(self, i: int) -> list[LinearInfo]:
        """Every quantizable linear of block ``i`` with its role, in group order."""
        infos = []
        for grp in self.spec.attn_groups:
            for p in self._existing(i, grp):
                infos.append(LinearInfo(f"{self.block_name(i)}.{p}", i, "attn", None, p.rpartition(".")[2]))
        for p, role, e in self._mlp_paths(i)[2]:
            infos.append(LinearInfo(f"{self.block_name(i)}.{p}", i, role, e, p.rpartition(".")[2]))
        return infos

    def linears(self) -> list[LinearInfo]:
        return [li for i in range(self.num_blocks) for li in self.block_linears(i)]

    def module(self, name: str) -> nn.Module:
        m = get_submodule(self.model, name)
        if m is None:
            raise KeyError(name)
        return m

    def full_precision_modules(self) -> list[str]:
        """Module names kept in full precision by default: routers, shared-expert gates, lm_head."""
        names = []
        for i in self.moe_blocks():
            names.append(f"{self.block_name(i)}.{self.spec.moe.router}")
            if self.shared_gate(i) is not None:
                names.append(f"{self.block_name(i)}.{self.spec.moe.shared_gate}")
        names.append(self.spec.lm_head)
        return names

    def checkpoint_name(self, name: str) -> str:
        """How ``name`` is spelled in the family's own HF checkpoints (e.g. Mixtral's w1/w3/w2)."""
        if self.spec.moe:
            for pat, repl in self.spec.moe.ckpt_renames:
                name = re.sub(pat, repl, name)
        return name

    def param_count(self) -> int:
        """Parameters, a tied head counted once (materialized or not)."""
        n = sum(p.numel() for p in self.model.parameters())
        head = get_submodule(self.model, self.spec.lm_head)
        emb = get_submodule(self.model, self.spec.embed)
        if getattr(self.config, "tie_word_embeddings", False) and head.weight is not emb.weight:
            n -= head.weight.numel()  # tied in the model's definition, two tensors in a streamed skeleton
        return n


def routing_weights(logits: torch.Tensor, adapter: ModelAdapter, router: nn.Module | None = None):
    """(top_k_index, top_k_weights) from router logits (N, E), by the spec's combine rule.

    Used to check the registry against the model's own routing, and wherever moeq needs the
    coefficients without running the experts.
    """
    moe, cfg, k = adapter.spec.moe, adapter.config, adapter.top_k
    rule = moe.combine
    renorm = rule == "softmax_topk_renorm" or (
        rule.endswith("_cfg") and bool(getattr(cfg, moe.renorm_attr or "", False)))
    if rule.startswith("softmax"):
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        w, idx = torch.topk(probs, k, dim=-1)  # (N, k)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
        return idx, w
    if rule == "sigmoid_topk_cfg":
        scores = logits.float().sigmoid()  # (N, E)
        bias = getattr(router, "e_score_correction_bias", torch.zeros(scores.shape[-1]))
        choice = scores + bias
        n_group, topk_group = int(getattr(cfg, "n_group", 1)), int(getattr(cfg, "topk_group", 1))
        N, E = choice.shape
        gs = choice.view(N, n_group, E // n_group).topk(min(2, E // n_group), dim=-1)[0].sum(-1)  # (N, G)
        keep = torch.zeros_like(gs).scatter_(1, torch.topk(gs, topk_group, dim=-1)[1], 1.0)
        mask = keep[:, :, None].expand(N, n_group, E // n_group).reshape(N, E).bool()
        idx = torch.topk(choice.masked_fill(~mask, float("-inf")), k, dim=-1)[1]
        w = scores.gather(1, idx)
        if renorm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * float(getattr(cfg, "routed_scaling_factor", 1.0))
    raise ValueError(f"unknown combine rule {rule!r}")
