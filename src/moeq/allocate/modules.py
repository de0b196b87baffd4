"""The quantizable linears of a model as plain records, and the units serving kernels fuse.

A :class:`ModuleRecord` is everything allocation needs to know about one linear (where it is, what
it is, its shape) without the model: profiles store them, so plans can be built and searched
offline. ``unit`` names the set of linears a fused serving kernel runs with one scheme (vLLM's
fused MoE runs all routed experts of a layer together; q/k/v is one fused GEMM; a dense or shared
MLP's gate and up are one merged linear). Units come from the adapter's view of the registry
(attention groups, MLP projection names), never from the architecture name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..models.adapter import ModelAdapter


@dataclass(frozen=True)
class ModuleRecord:
    name: str  # full module name in moeq's per-expert view
    block: int
    role: str  # "attn" | "expert" | "shared" | "dense_mlp"
    expert: int | None
    proj: str
    in_features: int
    out_features: int
    unit: str  # serving unit: members must share one scheme for fused kernels

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    def to_dict(self) -> dict:
        return asdict(self)


def inventory(adapter: ModelAdapter) -> list[ModuleRecord]:
    """Records of every quantizable linear, in block and group order (unfuses experts if needed,
    and restores the model's own layout afterwards)."""
    with adapter.per_expert():
        gate, up, _ = adapter.spec.mlp_proj_names
        attn_group = {}
        for k, grp in enumerate(adapter.spec.attn_groups):
            for p in grp:
                attn_group[p.rpartition(".")[2]] = k
        out = []
        for li in adapter.linears():
            mod = adapter.module(li.name)
            if li.role == "attn":
                unit = f"{li.block}.attn.{attn_group.get(li.proj, li.proj)}"
            elif li.role == "expert":
                unit = f"{li.block}.experts"
            elif li.proj in (gate, up):
                unit = f"{li.block}.{li.role}.gate_up"
            else:
                unit = f"{li.block}.{li.role}.{li.proj}"
            out.append(ModuleRecord(li.name, li.block, li.role, li.expert, li.proj, mod.in_features,
                                    mod.out_features, unit))
        return out


def serving_units(records: list[ModuleRecord]) -> dict[str, list[ModuleRecord]]:
    """unit -> its member records, in order of first appearance."""
    units: dict[str, list[ModuleRecord]] = {}
    for r in records:
        units.setdefault(r.unit, []).append(r)
    return units


def serving_violations(plan, records: list[ModuleRecord]) -> list[str]:
    """One message per serving unit whose members the plan gives different schemes (fused-MoE and
    fused-QKV kernels, e.g. vLLM's, cannot run those; transformers and fake-quant evaluation can)."""
    msgs = []
    for unit, members in serving_units(records).items():
        schemes = {plan.args_for(r.name) for r in members}
        if len(schemes) > 1:
            labels = sorted("fp" if a is None else a.label() for a in schemes)
            msgs.append(f"{unit}: {len(members)} linears mix {', '.join(labels)}")
    return msgs


def expert_schemes(plan, records: list[ModuleRecord]) -> set:
    """The distinct schemes a plan gives routed-expert linears."""
    return {plan.args_for(r.name) for r in records if r.role == "expert"}


def plan_warnings(plan, adapter: ModelAdapter) -> list[str]:
    """What a compressed-tensors export of ``plan`` on this model cannot keep: widths mixed inside a unit
    that loaders read with one scheme are stored at the unit's widest (see :mod:`moeq.export.containers`)."""
    records = inventory(adapter)
    out = []
    v = serving_violations(plan, records)
    if v:
        out.append(f"the plan mixes schemes inside {len(v)} fused units (e.g. {v[0]}); loaders and fused serving "
                   "kernels read one scheme per unit, so a compressed-tensors checkpoint stores each of them at its "
                   "widest member's scheme (same weights, more bytes); `moeq plan` keeps one width per unit by default")
    n = len(expert_schemes(plan, records))
    if n > 1 and adapter.spec.moe is not None and adapter.spec.moe.layout == "fused":
        out.append(f"routed experts use {n} schemes, but transformers reads all routed experts of a fused-expert "
                   "model with one scheme: a compressed-tensors checkpoint stores every routed expert at the widest")
    return out
