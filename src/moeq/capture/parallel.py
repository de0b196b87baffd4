"""The solve stage on several ranks (:mod:`moeq.utils.dist`): statistics summed, linears split, results shared.

After every rank has run its calibration batches through the block with the group's hooks:

1. :func:`share_stats`: every rank holds the same accumulators and aliases (an expert no batch of some
   rank reached gets an empty one there) and the same summed row / routed-token counts;
2. :func:`assign_owners`: each distinct input (a Hessian, solved with every linear that shares it) goes to
   one rank, balanced by the estimated cost of its solves (largest first, least-loaded rank);
3. :func:`reduce_hessians`: each Hessian is summed over the ranks onto its owner, the others free theirs;
4. the owner solves (:func:`moeq.capture.solve.solve_block`) and :func:`share_results` gives every rank
   every result, so all ranks write the same quantized weights back and propagate the same block.

With one process every step is the identity. Sums are taken in a different order than one process
takes them (per-rank partial sums), so Hessians can differ from the single-process ones in the last
float32 bits; the tests measure what that changes.
"""

from __future__ import annotations

import torch

from ..utils.dist import Dist
from .stats import GroupStats, HessianStats


def share_stats(gs: GroupStats, dist: Dist) -> None:
    """The union of every rank's accumulators and aliases; row and routed counts summed on every rank."""
    if not dist.enabled:
        return
    for widths, alias in dist.gather(({o: s.H.shape[0] for o, s in gs.stats.items()}, dict(gs.alias))):
        for owner, n_in in widths.items():
            if owner not in gs.stats and owner not in gs.alias:
                gs.stats[owner] = HessianStats(n_in, gs.device)
        for name, owner in alias.items():
            gs.alias.setdefault(name, owner)
    for name in [n for n in gs.stats if n in gs.alias]:  # aliased on another rank: its rows are the owner's too
        gs.stats.pop(name)
    owners = sorted(gs.stats)
    counts = torch.tensor([[gs.stats[o].rows, gs.stats[o].routed] for o in owners], dtype=torch.int64)  # (n, 2)
    dist.sum_(counts)
    for o, (rows, routed) in zip(owners, counts.tolist()):
        gs.stats[o].rows, gs.stats[o].routed = rows, routed


def assign_owners(ctx, names: list[str], gs: GroupStats | None, plan: dict, dist: Dist) -> dict[str, int]:
    """{owner (the linear whose accumulator a group of linears shares, or the linear itself): rank}."""
    cost: dict[str, float] = {}
    for rel in names:
        full = f"{ctx.name}.{rel}"
        if plan.get(full) is None:
            continue
        owner = gs.owner(full) if gs is not None else full
        out_f, in_f = ctx.adapter.module(full).weight.shape
        cost[owner] = cost.get(owner, float(in_f) ** 3) + float(out_f) * in_f * in_f  # Cholesky + column sweeps
    owners = sorted(cost)
    return dict(zip(owners, dist.assign([cost[o] for o in owners])))


def reduce_hessians(gs: GroupStats, rank_of: dict[str, int], dist: Dist) -> None:
    """Each accumulator summed onto the rank that solves it; the other ranks drop theirs."""
    if not dist.enabled:
        return
    for owner in sorted(gs.stats):
        dst = rank_of.get(owner, 0)
        dist.sum_to_(gs.stats[owner].H, dst)
        if dst != dist.rank:
            gs.stats[owner].H = torch.empty(0)


def share_results(solved: dict, dist: Dist) -> dict:
    """Every rank's {linear: (result, report row)} on every rank."""
    if not dist.enabled:
        return solved
    out: dict = {}
    for part in dist.gather(solved):
        out.update(part)
    return out


def share_hessian_sums(hsum: dict[int, list], dist: Dist, device) -> dict[int, list]:
    """The avg-hessian fallback's {input width: [sum of well-calibrated expert Hessians, count]} over all ranks."""
    if not dist.enabled:
        return hsum
    widths = sorted({w for part in dist.gather(sorted(hsum)) for w in part})
    out = {}
    for w in widths:
        total, count = hsum.get(w, [None, 0])
        total = total if torch.is_tensor(total) else torch.zeros(w, w, dtype=torch.float32, device=device)
        n = torch.tensor([count], dtype=torch.int64)
        dist.sum_(total)
        dist.sum_(n)
        out[w] = [total, int(n)]
    return out
