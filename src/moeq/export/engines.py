"""Serving engines' loading rules for compressed-tensors ``pack-quantized`` checkpoints, as data, and the
check of an export against them (``moeq check-serving``).

Each :class:`Engine` says what its loader accepts; :func:`violations` applies every rule to the
checkpoint's linears (their schemes as the engine itself resolves them from ``config_groups`` /
``ignore``) and returns one :class:`Violation` per broken rule and module, with the moeq setting that
fixes it. The rules were read from the engines' own code (versions in ``Engine.source``); a rule marked
``silent`` is one the engine breaks without an error (wrong weights), the worst kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..allocate.modules import ModuleRecord


@dataclass(frozen=True)
class Scheme:
    """What a loader reads for one linear."""

    num_bits: int
    group_size: int  # -1: per channel
    symmetric: bool
    actorder: str | None = None
    act_bits: int | None = None  # input_activations quantized (W*A*)

    def label(self) -> str:
        g = "c" if self.group_size == -1 else str(self.group_size)
        return f"w{self.num_bits}g{g}{'' if self.symmetric else 'a'}{f'a{self.act_bits}' if self.act_bits else ''}"


@dataclass(frozen=True)
class Engine:
    """What one engine's compressed-tensors loader accepts (read from its code; ``source`` says which)."""

    name: str
    source: str  # what the rules were read from
    moe_bits: tuple[int, ...]  # fused-MoE widths that load
    dense_bits: tuple[int, ...]
    moe_asym_bits: tuple[int, ...]  # widths whose asymmetric (zero-point) experts load correctly
    dense_asym_bits: tuple[int, ...]
    experts_per: str  # "layer": one scheme per layer's experts; "model": one for all routed experts
    actorder_group: bool  # group/dynamic activation ordering accepted
    tp_split_checked: bool  # the engine refuses a TP split that cuts scale groups (False: silently wrong)
    act_schemes: tuple[tuple[int, int], ...] | None  # (weight, activation) bits of W*A* int schemes it runs; None: any
    moe_asym_silent: bool = False  # asymmetric experts it cannot read load without an error
    tensor_parallel: bool = True  # serves with --tp (transformers: one process, no rule)
    hidden_group_rule: bool = True  # fused-MoE weights need hidden_size % group_size == 0


ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine("vllm", "vLLM 0.33.0: compressed_tensors.py, compressed_tensors_moe/*.py, schemes/compressed_tensors_wNa16.py",
           # compressed-tensors pads packed rows (32 // bits values per int32); vLLM sizes them ceil(K*bits/32):
           # 3/5/6/7-bit tensors do not fit
           moe_bits=(2, 4, 8), dense_bits=(2, 4, 8), moe_asym_bits=(4, 8), dense_asym_bits=(4, 8),
           experts_per="layer", actorder_group=False, tp_split_checked=True, act_schemes=((8, 8),)),
    Engine("sglang", "SGLang 0.5.23: srt/layers/quantization/compressed_tensors (+ fused_marlin_moe.py); symmetric-only "
           "MoE before 0.5.15, ROCm's Triton MoE path ignores zero points",
           moe_bits=(4, 8), dense_bits=(4, 8), moe_asym_bits=(), dense_asym_bits=(4,),
           experts_per="layer", actorder_group=True, tp_split_checked=False, act_schemes=((8, 8),), moe_asym_silent=True),
    Engine("transformers", "transformers 5.24: integrations/compressed_tensors.py (fused experts dequantized on load)",
           moe_bits=tuple(range(2, 9)), dense_bits=tuple(range(2, 9)), moe_asym_bits=(), dense_asym_bits=tuple(range(2, 9)),
           experts_per="model", actorder_group=True, tp_split_checked=True, act_schemes=None, tensor_parallel=False,
           hidden_group_rule=False),
)}


@dataclass(frozen=True)
class Violation:
    module: str  # checkpoint name of the module or unit
    rule: str
    fix: str
    silent: bool = False  # the engine would load it wrongly without an error
    count: int = 1  # linears it stands for (experts of a layer are reported once)

    def line(self) -> str:
        n = f" ({self.count} linears)" if self.count > 1 else ""
        return f"{self.module}{n}: {self.rule}{' (loads WRONGLY, no error)' if self.silent else ''}; fix: {self.fix}"


def _groups(qc: dict) -> list[tuple[list[str], Scheme]]:
    out = []
    for g in (qc.get("config_groups") or {}).values():
        w = g.get("weights") or {}
        if not w:
            continue
        gs = w.get("group_size") or -1
        out.append((list(g.get("targets") or []),
                    Scheme(int(w["num_bits"]), -1 if w.get("strategy") == "channel" else int(gs),
                           bool(w.get("symmetric", True)), w.get("actorder"),
                           int((g.get("input_activations") or {}).get("num_bits") or 0) or None)))
    return out


def _matches(target: str, name: str) -> bool:
    """compressed-tensors / vLLM semantics: ``re:`` patterns with re.match, plain names exactly, "Linear" all."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, "Linear")


def resolve_schemes(qc: dict, names: list[str]) -> dict[str, Scheme | None]:
    """{checkpoint name: the scheme a loader reads for it (first matching group), None when ignored or unmatched}."""
    groups, ignore = _groups(qc), list(qc.get("ignore") or [])
    out: dict[str, Scheme | None] = {}
    for n in names:
        if any(_matches(t, n) for t in ignore):
            out[n] = None
            continue
        out[n] = next((s for targets, s in groups if any(_matches(t, n) for t in targets)), None)
    return out


def violations(engine: Engine, records: list[ModuleRecord], schemes: dict[str, Scheme | None], tp: int = 1,
               hidden: int | None = None) -> list[Violation]:
    """Every rule of ``engine`` that the checkpoint (its linears ``records``, checkpoint-named, and the schemes
    the loader reads) breaks, with tensor-parallel size ``tp``."""
    out: list[Violation] = []
    units: dict[str, list[ModuleRecord]] = {}
    for r in records:
        key = "routed experts" if engine.experts_per == "model" and r.role == "expert" else r.unit
        units.setdefault(key, []).append(r)
    for unit, members in units.items():
        got = {schemes[r.name] for r in members}
        if len(got) > 1:
            labels = ", ".join(sorted("full precision" if s is None else s.label() for s in got))
            where = unit if unit == "routed experts" else f"{members[0].name} (fused unit {unit})"
            silent = None not in got  # engines check one member (expert 0, the first shard) and read the rest as it
            out.append(Violation(where, f"{len(members)} linears that {engine.name} reads with one scheme mix {labels}",
                                 "quantize the unit with one scheme (`moeq plan` keeps one width per unit; moeq "
                                 "quantize stores mixed units in one container scheme)", silent))
    for r in records:
        s = schemes[r.name]
        if s is None:
            continue
        moe = r.role == "expert"
        what = "fused-MoE experts" if moe else "dense linears"
        bits_ok = engine.moe_bits if moe else engine.dense_bits
        if s.num_bits not in bits_ok:
            out.append(Violation(r.name, f"{engine.name} loads {what} at {'/'.join(map(str, bits_ok))} bits only, "
                                         f"this is {s.num_bits}-bit",
                                 f"`moeq quantize --bits {min(b for b in bits_ok if b >= s.num_bits)}` or "
                                 f"`moeq plan --engine {engine.name}`"))
        asym_ok = engine.moe_asym_bits if moe else engine.dense_asym_bits
        if not s.symmetric and s.num_bits not in asym_ok:
            out.append(Violation(r.name, f"{engine.name} cannot read zero points of {s.num_bits}-bit {what} "
                                         f"({'no asymmetric ' + what if not asym_ok else 'asymmetric only at ' + '/'.join(map(str, asym_ok)) + ' bits'})",
                                 "`moeq quantize --sym`", silent=engine.moe_asym_silent and moe))
        if s.actorder in ("group", "dynamic") and not engine.actorder_group:
            out.append(Violation(r.name, f"{engine.name} rejects actorder={s.actorder}", "quantize without act-order"))
        if s.act_bits and engine.act_schemes is not None and (s.num_bits, s.act_bits) not in engine.act_schemes:
            out.append(Violation(r.name, f"{engine.name} has no kernel for integer W{s.num_bits}A{s.act_bits}",
                                 "serve a weight-only export (no --act-bits)"))
        if moe and engine.hidden_group_rule and hidden and s.group_size != -1 and hidden % s.group_size:
            out.append(Violation(r.name, f"hidden size {hidden} is not a multiple of group size {s.group_size}",
                                 "a --group-size dividing it"))
        split = _tp_split(r, tp) if engine.tensor_parallel else None
        if split is not None and r.in_features % tp:
            out.append(Violation(r.name, f"its input width {r.in_features} does not split over --tp {tp}",
                                 "a --tp dividing it"))
        elif split and s.group_size != -1 and split % s.group_size:
            fit = [g for g in (128, 64, 32) if split % g == 0]
            out.append(Violation(r.name, f"under --tp {tp} each rank holds {split} input columns, not a multiple of "
                                         f"group size {s.group_size}: scale groups would cross the shards",
                                 f"`moeq quantize --group-size {fit[0]}`" if fit else "a smaller --tp",
                                 silent=not engine.tp_split_checked))
    return _collapse(out)


def _collapse(vs: list[Violation]) -> list[Violation]:
    """One violation per rule and projection for the experts of a layer (``experts.*.down_proj``)."""
    merged: dict[tuple, Violation] = {}
    for v in vs:
        key = (re.sub(r"\.experts\.\d+\.", ".experts.*.", v.module), v.rule, v.fix, v.silent)
        old = merged.get(key)
        merged[key] = replace(v, module=key[0], count=v.count + (old.count if old else 0))
    return list(merged.values())


def _tp_split(r: ModuleRecord, tp: int) -> int | None:
    """Input columns per rank of a row-parallel linear (down/o projections split their input) under ``tp``."""
    if tp <= 1 or r.proj not in ("down_proj", "o_proj"):
        return None
    return r.in_features // tp
