"""QuantMoE-Bench bit-allocation heuristics as composable rules: (profile, rules) -> BitPlan.

Role rules set a width per kind of linear: ``bits`` for routed experts (and anything no other rule
names), ``attn_bits``, ``shared_bits`` and ``dense_bits`` (dense MLPs of non-MoE blocks; defaults to
``attn_bits``, the paper's "other_block" convention). Selection rules then *raise* the linears they
select to at least their width B (paper section 2.2):

* ``freq_top`` K@B: per MoE layer the K experts the router picked most often on the calibration data;
* ``alpha``: mix frequency and outlier selection; per layer K - floor(alpha K) frequent experts, and
  the same total number of expert linears as the experts given up, taken model-wide in descending
  outlier score (a consistent version of the co-author code's ``alpha`` configs);
* ``first_k`` / ``last_k`` K@B: every expert of the first / last K MoE blocks;
* ``outlier_top`` P@B: the top P% of routed-expert linears by outlier score, model-wide;
* ``importance_top`` K@B: every expert of the K blocks the block-importance predictor ranks first.

With ``random_seed`` every selection rule draws random targets of the same count instead (the
paper's baselines use seeds 42, 43, 44); each rule has its own stream, so results are reproducible.
With ``serving_compatible`` (the default) every serving unit (see :mod:`.modules`) is raised to its widest member,
so every loader and fused kernel can run the plan with the widths it names.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import asdict, dataclass

from ..config import BitPlan
from ..evaluate.report import bit_stats
from ..quant.primitives import QuantArgs
from .modules import ModuleRecord, expert_schemes, serving_units, serving_violations
from .scores import importance_ranking, top_experts


@dataclass(frozen=True)
class Selection:
    count: float  # experts per layer or blocks (K), or percent of expert linears (P)
    bits: int

    @classmethod
    def parse(cls, text: str | None, default_bits: int, flag: str = "") -> "Selection | None":
        """"K" or "K@B" -> Selection (B defaults to ``default_bits``)."""
        if text is None:
            return None
        k, _, b = str(text).partition("@")
        try:
            sel = cls(float(k), int(b) if b else default_bits)
        except ValueError:
            raise ValueError(f"{flag or 'selection'} takes K or K@BITS (e.g. 2@4), got {text!r}") from None
        if sel.count < 0:
            raise ValueError(f"{flag or 'selection'} count must be >= 0, got {text!r}")
        QuantArgs(sel.bits, -1)  # validates the width
        return sel


@dataclass(frozen=True)
class PlanRules:
    bits: int = 2
    attn_bits: int | None = None
    shared_bits: int | None = None
    dense_bits: int | None = None
    group_size: int = 128
    symmetric: bool = True
    freq_top: Selection | None = None
    alpha: float = 0.0
    first_k: Selection | None = None
    last_k: Selection | None = None
    outlier_top: Selection | None = None
    importance_top: Selection | None = None
    random_seed: int | None = None
    serving_compatible: bool = True  # False: widths may differ inside a fused unit (--mix-units)
    engine: str | None = None  # widths raised to what this serving engine loads (moeq.export.engines)

    def __post_init__(self):
        for b in (self.bits, self.attn_bits, self.shared_bits, self.dense_bits):
            if b is not None:
                QuantArgs(b, self.group_size, self.symmetric)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.alpha and self.freq_top is None:
            raise ValueError("--alpha mixes frequency and outlier selection: give --freq-top K@B with it")
        if self.engine is not None:
            engine_widths(self.engine, "expert", self.symmetric)  # a clear error for a scheme it cannot load

    def to_dict(self) -> dict:
        return asdict(self)


def _count(sel: Selection, n: int, what: str) -> int:
    k = int(sel.count)
    if k != sel.count or k > n:
        raise ValueError(f"{what}: count {sel.count:g} must be a whole number <= {n}")
    return k


def _rng(rules: PlanRules, rule: str) -> random.Random | None:
    return None if rules.random_seed is None else random.Random(f"{rules.random_seed}/{rule}")


def _need(ok: bool, flag: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{flag} needs {what} in the profile; run `moeq profile` (or `moeq plan` without --profile) "
                         "on a mixture-of-experts model")


def rule_bits(profile, rules: PlanRules) -> dict[str, int]:
    """{linear name: bits} the rules give every linear of ``profile.modules`` (pure)."""
    mods = profile.modules
    role_bits = {"attn": rules.attn_bits, "shared": rules.shared_bits,
                 "dense_mlp": rules.dense_bits if rules.dense_bits is not None else rules.attn_bits}
    bits = {r.name: role_bits.get(r.role) or rules.bits for r in mods}
    experts = [r for r in mods if r.role == "expert"]
    by_block: dict[int, list[ModuleRecord]] = {}
    for r in experts:
        by_block.setdefault(r.block, []).append(r)
    blocks = [b for b in profile.moe_blocks if b in by_block]

    def raise_to(names, b):
        for n in names:
            bits[n] = max(bits[n], b)

    def block_experts(bs):
        return [r.name for b in bs for r in by_block[b]]

    if rules.freq_top is not None:
        _need(bool(experts), "--freq-top", "routed experts")
        k = _count(rules.freq_top, profile.num_experts, "--freq-top")
        k_mix = math.floor(rules.alpha * k)
        rng = _rng(rules, "freq")
        chosen = set()
        for b in blocks:
            if rng is None:
                _need(b in profile.usage, "--freq-top", "expert usage")
                top = top_experts(profile.usage[b], k - k_mix)
            else:
                top = rng.sample(range(profile.num_experts), k - k_mix)
            chosen |= {r.name for r in by_block[b] if r.expert in top}
        if k_mix:
            per_expert = len(experts) // max(1, len(blocks) * profile.num_experts)
            extra = k_mix * len(blocks) * per_expert
            rest = [r.name for r in experts if r.name not in chosen]
            mix_rng = _rng(rules, "alpha")
            if mix_rng is None:
                _need(bool(profile.outlier), "--alpha", "outlier scores")
                rest.sort(key=lambda n: -profile.outlier.get(n, 0.0))
                chosen |= set(rest[:extra])
            else:
                chosen |= set(mix_rng.sample(rest, min(extra, len(rest))))
        raise_to(chosen, rules.freq_top.bits)
    for flag, sel, pick in (("--first-k", rules.first_k, lambda k: blocks[:k]),
                            ("--last-k", rules.last_k, lambda k: blocks[len(blocks) - k:])):
        if sel is not None:
            _need(bool(experts), flag, "routed experts")
            k = _count(sel, len(blocks), flag)
            rng = _rng(rules, flag.strip("-"))
            raise_to(block_experts(pick(k) if rng is None else rng.sample(blocks, k)), sel.bits)
    if rules.outlier_top is not None:
        _need(bool(experts), "--outlier-top", "routed experts")
        if rules.outlier_top.count > 100:
            raise ValueError("--outlier-top is a percentage of expert linears (0..100), got "
                             f"{rules.outlier_top.count:g}")
        n = int(round(rules.outlier_top.count / 100 * len(experts)))
        rng = _rng(rules, "outlier")
        if rng is None:
            _need(bool(profile.outlier), "--outlier-top", "outlier scores")
            ranked = sorted((r.name for r in experts), key=lambda n: -profile.outlier.get(n, 0.0))
            raise_to(ranked[:n], rules.outlier_top.bits)
        else:
            raise_to(rng.sample([r.name for r in experts], n), rules.outlier_top.bits)
    if rules.importance_top is not None:
        _need(bool(experts), "--importance-top", "routed experts")
        k = _count(rules.importance_top, len(blocks), "--importance-top")
        rng = _rng(rules, "importance")
        if rng is None:
            imp = {b: s for b, s in profile.block_importance().items() if b in blocks}
            _need(len(imp) == len(blocks), "--importance-top", "block-importance scores")
            top = importance_ranking(imp)[:k]
        else:
            top = rng.sample(blocks, k)
        raise_to(block_experts(top), rules.importance_top.bits)
    if rules.engine is not None:
        for r in mods:
            allowed = engine_widths(rules.engine, r.role, rules.symmetric)
            bits[r.name] = min((b for b in allowed if b >= bits[r.name]), default=max(allowed))
    if rules.serving_compatible or rules.engine is not None:
        for members in serving_units(mods).values():
            raise_to([r.name for r in members], max(bits[r.name] for r in members))
    return bits


def engine_widths(engine: str, role: str, symmetric: bool) -> tuple[int, ...]:
    """Widths ``engine`` loads for a linear of ``role`` with this symmetry (ValueError when none)."""
    from ..export.engines import ENGINES

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    e = ENGINES[engine]
    moe = role == "expert"
    widths = (e.moe_bits if moe else e.dense_bits) if symmetric else (e.moe_asym_bits if moe else e.dense_asym_bits)
    if not widths:
        raise ValueError(f"{engine} cannot load asymmetric {'experts' if moe else 'linears'}: plan with --sym")
    return widths


def plan_from_bits(bits: dict[str, int | None], group_size: int, symmetric: bool) -> BitPlan:
    """A compact BitPlan: the most common width is the default, every other linear an override."""
    common = Counter(b for b in bits.values() if b is not None).most_common(1)
    default = QuantArgs(common[0][0] if common else 4, group_size, symmetric)
    overrides = {n: (None if b is None else QuantArgs(b, group_size, symmetric))
                 for n, b in bits.items() if b != default.num_bits}
    return BitPlan(default=default, overrides=overrides)


def build_plan(profile, rules: PlanRules) -> BitPlan:
    """The BitPlan the rules give the profiled model (pure)."""
    return plan_from_bits(rule_bits(profile, rules), rules.group_size, rules.symmetric)


def plan_stats(plan: BitPlan, modules: list[ModuleRecord]) -> dict:
    """Average bits (plain, and with one 16-bit scale, plus zero point when asymmetric, per group and row),
    parameters per width and per role, and the serving-kernel violations of ``plan`` on ``modules``."""
    rows, by_bits, by_role, fp = [], Counter(), {}, 0
    for r in modules:
        a = plan.args_for(r.name)
        if a is None:
            fp += r.params
            continue
        rows.append({"bits": a.num_bits, "params": r.params, "out_features": r.out_features,
                     "in_features": r.in_features, "group_size": a.group_size, "symmetric": a.symmetric,
                     "group_bits": a.group_bits()})
        by_bits[a.num_bits] += r.params
        by_role.setdefault(r.role, []).append(rows[-1])
    out = bit_stats(rows)
    out["fp_params"] = fp
    out["params_by_bits"] = {str(b): n for b, n in sorted(by_bits.items())}
    out["avg_bits_by_role"] = {role: bit_stats(rs)["avg_bits"] for role, rs in by_role.items()}
    v = serving_violations(plan, modules)
    out["serving_compatible"], out["serving_violations"] = not v, v
    out["expert_schemes"] = len(expert_schemes(plan, modules))  # > 1: transformers cannot load fused experts
    return out
