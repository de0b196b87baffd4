"""Budgeted bit allocation: the plan that minimises the profiled sensitivity under an average-bits budget.

``allocate(profile, budget)`` is a pure function of its arguments. Each *item* is one linear, or one
serving unit with ``serving_compatible`` (all routed experts of a layer, fused q/k/v, ...: one width
for all members). Choosing width b for item u costs params_u x b bits and costs sens_u(b) in
predicted error (the sum of its members' frequency-weighted losses, :mod:`.sensitivity`). The
budget is sum(b x params) <= budget x sum(params), checked in exact rational arithmetic, so the
average bits of the result never exceed the budget.

* ``knapsack``: multiple-choice knapsack by dynamic programming over integer costs in units of the
  gcd of the items' parameter counts. Exact (optimal) whenever the table fits ``max_cells``; otherwise
  costs are rounded *up* to a coarser unit, which keeps every solution within budget but may leave a
  little budget unused (``SearchResult.exact`` is then False).
* ``greedy``: start every item at the lowest width and repeatedly apply the upgrade with the largest
  error reduction per extra bit that still fits. Fast, not always optimal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from ..config import BitPlan
from .modules import serving_units
from .plan import plan_from_bits

METHODS = ("knapsack", "greedy")


@dataclass
class SearchResult:
    plan: BitPlan
    bits: dict[str, int]  # linear -> chosen width
    predicted: float  # sum of sensitivities of the chosen widths
    avg_bits: float
    exact: bool  # knapsack solved without coarsening (optimal)
    info: dict = field(default_factory=dict)


def _items(profile, serving_compatible: bool) -> list[list]:
    if serving_compatible:
        return [list(m) for m in serving_units(profile.modules).values()]
    return [[r] for r in profile.modules]


def _budget(budget) -> Fraction:
    try:
        b = Fraction(str(budget))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--avg-bits must be a number, got {budget!r}") from None
    return b


def predicted_error(profile, bits: dict[str, int]) -> float:
    """Sum of the profiled sensitivities of a {linear: width} assignment (widths must be candidates)."""
    missing = [n for n, b in bits.items() if b not in profile.sensitivity.get(n, {})]
    if missing:
        raise ValueError(f"no profiled sensitivity for {missing[0]} at {bits[missing[0]]} bits; profile with "
                         f"--candidates including it")
    return float(sum(profile.sensitivity[n][b] for n, b in bits.items()))


def search(profile, budget: float, method: str = "knapsack", serving_compatible: bool = True,
           candidates: list[int] | None = None, max_cells: int = 40_000_000, engine: str | None = None) -> SearchResult:
    """Minimise the predicted error subject to average bits <= ``budget``; see the module docstring. With
    ``engine`` each unit only takes widths that engine loads for it (and units are never mixed)."""
    if method not in METHODS:
        raise ValueError(f"unknown search {method!r}; choose from {', '.join(METHODS)}")
    if not profile.candidates or not any(profile.sensitivity.values()):
        raise ValueError("the profile has no sensitivities; rerun `moeq profile` without --no-sensitivity (and with "
                         "--candidates widths such as 2,3,4,8)")
    cands = sorted(set(candidates or profile.candidates))
    if not cands or not set(cands) <= set(profile.candidates):
        raise ValueError(f"candidate widths {cands} must be a non-empty subset of the profiled {profile.candidates}")
    items = _items(profile, serving_compatible or engine is not None)
    params = np.array([sum(r.params for r in it) for it in items], dtype=np.int64)  # (U,)
    V = np.array([[sum(profile.sensitivity[r.name][b] for r in it) for b in cands] for it in items])  # (U, O)
    if engine is not None:  # widths the engine cannot load for a unit are priced out
        from .plan import engine_widths

        ok = np.array([[b in engine_widths(engine, it[0].role, profile.symmetric) for b in cands] for it in items])
        if not ok.any(1).all():
            raise ValueError(f"no candidate width {cands} is one {engine} loads for every unit; profile with "
                             f"--candidates including 4 and 8")
        V = np.where(ok, V, np.inf)
    total = int(params.sum())
    B = _budget(budget)
    cap_bits = math.floor(B * total)  # bit budget, exact
    if cands[0] * total > cap_bits:
        raise ValueError(f"--avg-bits {budget} is below the lowest candidate width {cands[0]}; raise it or "
                         f"profile with a lower --candidates width")
    bits_arr = np.array(cands, dtype=np.int64)  # (O,)
    if method == "knapsack":
        choice, exact, unit = _knapsack(params, bits_arr, V, cap_bits, max_cells)
    else:
        choice, exact, unit = _greedy(params, bits_arr, V, cap_bits), False, 1
    if not np.isfinite(V[np.arange(len(items)), choice]).all():
        raise ValueError(f"--avg-bits {budget} cannot give every unit a width {engine} loads; raise it")
    bits = {r.name: cands[choice[u]] for u, it in enumerate(items) for r in it}
    used = int((params * bits_arr[choice]).sum())
    assert used <= cap_bits, "search exceeded the budget"
    plan = plan_from_bits(bits, profile.group_size, profile.symmetric)
    return SearchResult(plan, bits, float(V[np.arange(len(items)), choice].sum()), used / total, exact,
                        {"method": method, "budget": float(budget), "items": len(items), "cost_unit": unit,
                         "serving_compatible": serving_compatible or engine is not None, "candidates": cands,
                         "engine": engine})


def allocate(profile, budget: float, method: str = "knapsack", serving_compatible: bool = True,
             candidates: list[int] | None = None) -> BitPlan:
    """Pure (profile, budget) -> BitPlan: the minimum-error plan within the average-bits budget."""
    return search(profile, budget, method, serving_compatible, candidates).plan


def _knapsack(params, bits, V, cap_bits: int, max_cells: int):
    """Exact multiple-choice knapsack on integer costs. -> (choice per item (U,), exact, cost unit)."""
    U = len(params)
    unit = int(np.gcd.reduce(params))
    cost = (params // unit)[:, None] * bits[None, :]  # (U, O) bits of item u at option o, in units of `unit`
    C = cap_bits // unit
    scale = max(1, math.ceil(U * (C + 1) / max_cells))
    if scale > 1:  # coarsen: round costs up so any solution stays within the real budget
        cost = -(-cost // scale)
        C = C // scale
    C = int(min(C, cost.max(1).sum()))  # no need for more capacity than the all-widest plan
    dp = np.full(C + 1, np.inf)  # dp[c]: least error with total cost exactly c
    dp[0] = 0.0
    pick = np.zeros((U, C + 1), dtype=np.int8)  # (U, C+1) option chosen for item u at cost c
    for u in range(U):
        new = np.full(C + 1, np.inf)
        for o in range(cost.shape[1]):
            c = int(cost[u, o])
            if c > C:
                continue
            cand = np.full(C + 1, np.inf)
            cand[c:] = dp[: C + 1 - c] + V[u, o]
            better = cand < new
            new[better] = cand[better]
            pick[u, better] = o
        dp = new
    c = int(np.argmin(dp))  # lowest-cost among the least-error totals
    if not np.isfinite(dp[c]):
        raise ValueError("no plan fits the budget; raise --avg-bits")
    choice = np.zeros(U, dtype=np.int64)
    for u in range(U - 1, -1, -1):
        choice[u] = pick[u, c]
        c -= int(cost[u, choice[u]])
    return choice, scale == 1, unit * scale


def _greedy(params, bits, V, cap_bits: int):
    """Best error reduction per extra bit first. -> choice per item (U,)."""
    U, O = V.shape
    cost = params[:, None] * bits[None, :]  # (U, O) bits
    choice = np.zeros(U, dtype=np.int64)
    left = cap_bits - int(cost[:, 0].sum())
    rows = np.arange(U)
    while True:
        cur_v, cur_c = V[rows, choice][:, None], cost[rows, choice][:, None]  # (U, 1)
        gain, extra = cur_v - V, cost - cur_c  # (U, O)
        ok = (extra > 0) & (extra <= left) & (gain > 0)
        if not ok.any():
            return choice
        ratio = np.where(ok, gain / np.maximum(extra, 1), -np.inf)  # (U, O)
        u, o = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        left -= int(extra[u, o])
        choice[u] = o
