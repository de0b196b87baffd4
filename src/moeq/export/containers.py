"""Storage schemes: every fused unit is written with one scheme, losslessly, so no loader misreads it.

Loaders read one quantization scheme per fused unit, whatever the config groups say: transformers (5.x)
decompresses *all* routed experts of a fused-expert model with one config group (the first whose
targets name experts), vLLM's fused MoE takes one scheme per layer's experts, and fused q/k/v and
gate/up GEMMs one per layer. A plan that mixes widths inside such a unit would be loaded wrongly, with
no error (measured: a per-expert mixed plan reloaded in transformers at 8x the perplexity).

A narrower grid fits exactly inside a wider one: b-bit integers and zero points lie inside the b'-bit
range for b' >= b (compressed-tensors' signed convention), and a group's scale and zero point repeated
over sub-groups of size g' | g give the same values. So each unit is stored in its *container*: the
widest member's bits, a group size dividing every member's, the members' (common) symmetry. The
dequantized weights are identical to the ones moeq evaluated; only the stored bits grow. A unit that
mixes full precision with integers, symmetric with asymmetric grids, or a K-quant float-minimum grid with
another one has no container: refused.
"""

from __future__ import annotations

import math

from ..allocate.modules import ModuleRecord
from ..quant.primitives import QuantArgs
from ..solvers.base import QuantResult


def storage_units(records: list[ModuleRecord], fused_experts: bool, gguf: bool = False) -> dict[str, list[ModuleRecord]]:
    """unit -> members: the serving units of :mod:`moeq.allocate.modules`; with ``fused_experts`` (the
    model's own layout fuses experts, so transformers reads them with one scheme) all routed experts of
    the model form one unit. ``gguf`` (a GGUF-only output): llama.cpp's tensors instead, a layer's routed
    experts per projection (one stacked tensor, one type) and every other linear alone."""
    units: dict[str, list[ModuleRecord]] = {}
    for r in records:
        if gguf:
            key = f"{r.block}.experts.{r.proj}" if r.role == "expert" else r.name
        else:
            key = "experts" if fused_experts and r.role == "expert" else r.unit
        units.setdefault(key, []).append(r)
    return units


def container(members: list[tuple[ModuleRecord, QuantArgs]]) -> QuantArgs:
    """The narrowest scheme holding every member's grid exactly; ValueError when there is none."""
    if len({a for _, a in members}) == 1:
        return members[0][1]
    syms = {a.symmetric for _, a in members}
    if len(syms) > 1:
        raise ValueError("mixes symmetric and asymmetric grids")
    if any(a.float_zero for _, a in members):  # a wider grid would move the minima off their super-block grid
        raise ValueError("mixes a K-quant float-minimum grid (Q2_K/Q4_K/Q5_K) with other grids")
    if all(a.group_size == -1 for _, a in members):
        gs = -1
    else:
        gs = math.gcd(*[r.in_features if a.group_size == -1 else a.group_size for r, a in members])
    return QuantArgs(max(a.num_bits for _, a in members), gs, syms.pop(),
                     ggml=all(a.ggml for _, a in members))  # ggml grids hold narrower ggml grids exactly


def storage_schemes(records: list[ModuleRecord], schemes: dict[str, QuantArgs | None],
                    fused_experts: bool, gguf: bool = False) -> dict[str, QuantArgs]:
    """{quantized linear: the scheme it is stored with}. ``schemes``: the run's grid of every linear (None:
    full precision). Raises ValueError naming the unit when a unit cannot be stored with one scheme."""
    out: dict[str, QuantArgs] = {}
    for unit, members in storage_units(records, fused_experts, gguf).items():
        quantized = [(r, schemes[r.name]) for r in members if schemes.get(r.name) is not None]
        if not quantized:
            continue
        where = "the routed experts" if unit == "experts" else f"fused unit {unit}"
        if len(quantized) < len(members):
            fp = next(r.name for r in members if schemes.get(r.name) is None)
            raise ValueError(
                f"the plan keeps {fp} in full precision but quantizes other linears of {where}; loaders read one "
                "scheme for all of them, so a compressed-tensors checkpoint of it would not load. Quantize the "
                "whole unit (or keep all of it in full precision), or pass --format gguf")
        try:
            c = container(quantized)
        except ValueError as e:
            raise ValueError(f"the plan {e} inside {where}; loaders read one scheme for all of them: "
                             "give the whole unit one scheme (one of --sym/--asym, one K-quant type)") from None
        out.update({r.name: c for r, _ in quantized})
    return out


def widen(r: QuantResult, args: QuantArgs) -> QuantResult:
    """The same weights on the container grid ``args`` (same integers, scales repeated per sub-group)."""
    if r.args == args:
        return r
    if args.num_bits < r.args.num_bits or args.symmetric != r.args.symmetric or r.g_idx is not None:
        raise ValueError(f"{r.args.label()} does not fit inside {args.label()}")
    inp = r.q.shape[1]
    g_from = inp if r.args.group_size == -1 else r.args.group_size
    g_to = inp if args.group_size == -1 else args.group_size
    if g_from % g_to:
        raise ValueError(f"{r.args.label()} does not fit inside {args.label()}")
    k = g_from // g_to
    scale = r.scale.repeat_interleave(k, dim=1)  # (out, G * k)
    zero = r.zero.repeat_interleave(k, dim=1)  # (out, G * k)
    return QuantResult(r.q, scale, zero, args, None, r.loss, r.info)


def widened_count(schemes: dict[str, QuantArgs | None], storage: dict[str, QuantArgs]) -> int:
    """How many linears are stored wider than their grid."""
    return sum(1 for n, a in storage.items() if schemes.get(n) != a)


def stored_bits(records: list[ModuleRecord], storage: dict[str, QuantArgs]) -> float:
    """Average stored bits per quantized weight (integers only)."""
    n = sum(r.params for r in records if r.name in storage)
    return sum(storage[r.name].num_bits * r.params for r in records if r.name in storage) / max(n, 1)


def run_storage(adapter, plan: dict[str, QuantArgs | None], formats=("compressed-tensors",)
                ) -> tuple[dict[str, QuantArgs], list[ModuleRecord]]:
    """(storage schemes, module records) of a run's resolved plan on ``adapter``'s model (see :func:`storage_schemes`):
    when ``formats`` include compressed-tensors, the units its loaders read with one scheme (all routed experts
    when the family's own layout fuses them, as transformers reads them); a GGUF-only output needs one scheme
    per llama.cpp tensor only."""
    from ..allocate.modules import inventory

    records = inventory(adapter)
    moe = adapter.spec.moe
    gguf = "compressed-tensors" not in formats
    fused = not gguf and moe is not None and moe.layout == "fused"
    return storage_schemes(records, plan, fused_experts=fused, gguf=gguf), records
