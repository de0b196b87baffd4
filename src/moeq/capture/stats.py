"""Statistics the block loop accumulates for the linears of one true-sequential group.

``HessianStats`` holds sum_i c_i x_i x_i^T (c_i = 1 unless affinity weighting is on) and the token
counts; hooks on every linear of the group feed it. Each batch's product is taken in fp32 and added to an
fp64 sum: fp64 holds such sums of fp32 terms exactly (unless one entry's terms span more than ~2^29), so
the sum does not depend on the order of the batches, and a run whose batches are split over several
ranks (summed across them in fp64) gets the Hessians of the single-process run, bit for bit. Linears that receive the *same* input
tensor (q/k/v, an expert's gate/up) share one accumulator: the first forward records the aliasing
and later forwards skip the duplicates, so each input is multiplied out once.

Row weights come from the block's routing observer (``ModelAdapter.routing``): :func:`row_weight_fn`
gives an expert's (or shared expert's) linears the combine coefficients c of their rows (AGQ), and
:func:`c2_weight_fn` gives c^2 (the profile's impact Hessians).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.moe import RoutingObserver
from .hooks import StopForward


def row_weight_fn(routing: RoutingObserver, agq: bool, unweighted_projs: tuple[str, ...] = ()):
    """Hook helper for linears: (row weights (r,) or None, routed-row count or None).

    A linear inside an expert / the shared expert finds its parent's call in the observer; with AGQ its
    rows are weighted by their combine coefficients c (paired with its rows by construction: the ExpertSet
    hands each expert exactly its rows and their c). Other linears get (None, None)."""
    def fn(name, mod, x):
        parent, _, proj = name.rpartition(".")
        call = routing.call(parent)
        if call is None:
            return None, None
        w = call.weight if agq and proj not in unweighted_projs else None
        return w, int(call.routed.sum())
    return fn


def c2_weight_fn(routing: RoutingObserver):
    """Row weights c^2 for expert / shared-expert linears (one tensor per call, so linears sharing an input
    keep sharing a Hessian)."""
    base = row_weight_fn(routing, agq=True)
    memo: dict = {}

    def fn(name, mod, x):
        w, routed = base(name, mod, x)
        if w is None:
            return None, routed
        if memo.get("w") is not w:
            memo.update(w=w, c2=w.float().pow(2))  # (r,)
        return memo["c2"], routed
    return fn


class HessianStats:
    """Running sum of (weighted) x x^T over calibration rows for one linear input (fp64, see the module
    docstring); its mean is fp32."""

    def __init__(self, n_in: int, device):
        self.H = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)  # (in, in)
        self.C = None  # GPTAQ: running sum of (x_fp - x) x^T (in, in) fp64, when FP rows are given
        self.rows = 0  # rows accumulated (all rows when coverage is "all")
        self.routed = 0  # of which routed to this module (== rows outside experts)
        self._divided = False

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None, routed: int | None = None,
            x_fp: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (r, in)
        root = weight.float().clamp_min(0).sqrt()[:, None] if weight is not None else None  # (r, 1)
        if root is not None:
            x = x * root  # rows scaled by sqrt(c)
        self.H.add_(x.T @ x)  # one fp32 matmul over all rows (no loop over tokens), added in fp64
        if x_fp is not None:  # GPTAQ's cross term, weighted like H
            d = x_fp.reshape(x.shape).float() * (root if root is not None else 1) - x  # (r, in)
            self.C = (d.T @ x).double() if self.C is None else self.C.add_(d.T @ x)
        self.rows += x.shape[0]
        self.routed += x.shape[0] if routed is None else int(routed)

    def mean(self) -> torch.Tensor:
        """H / rows: the mean of c x x^T per calibration row (in, in) fp32."""
        return self.H.float() / max(1, self.rows)

    def cross_mean(self) -> torch.Tensor | None:
        """GPTAQ: mean (x_fp - x) x^T per calibration row (in, in) fp32, None without FP rows."""
        return None if self.C is None else self.C.float() / max(1, self.rows)

    def take_mean(self) -> torch.Tensor:
        """The mean; the fp64 sum is released (replaced by the fp32 mean) afterwards."""
        if not self._divided:
            self.H = self.H.float().div_(max(1, self.rows))
            self._divided = True
        return self.H


class GroupStats:
    """Hooks on the linears of one group; ``stats[owner]`` per distinct input, ``alias[name] = owner``.

    ``row_weight(name, module, x)`` may return (per-row weights (r,), routed-row count) for a linear,
    e.g. affinity weights and routed counts of experts; it returns (None, None) otherwise.
    Call :meth:`new_forward` before each block forward: aliasing is detected per forward by input
    identity within the same parent module (so different experts never alias each other).
    """

    def __init__(self, modules: dict[str, nn.Module], device, row_weight=None, stop_when_complete: bool = False,
                 fp_rows=None):
        self.modules, self.device, self.row_weight = modules, device, row_weight
        self.fp_rows = fp_rows  # GPTAQ: (name, batch k, rows) -> the FP model's paired input rows, or None
        self.batch = -1  # index of the current forward's calibration batch
        self.stats: dict[str, HessianStats] = {}
        self.alias: dict[str, str] = {}
        self._seen: dict[tuple, str] = {}
        self._called: set[str] = set()
        self._handles = []
        # raise StopForward once every module has seen this forward's input: the rest of the block
        # is not needed for this group's statistics (used for attention groups)
        self.stop_when_complete = stop_when_complete

    def new_forward(self) -> None:
        self.batch += 1
        self._seen.clear()
        self._called.clear()

    def _maybe_stop(self, name):
        self._called.add(name)
        if self.stop_when_complete and len(self._called) == len(self.modules):
            raise StopForward

    def _hook(self, name):
        parent = name.rpartition(".")[0]

        def hook(mod, inputs):
            x = inputs[0]
            w, routed = self.row_weight(name, mod, x) if self.row_weight else (None, None)
            # same input tensor and same row weights -> same Hessian
            key = (parent, x.data_ptr(), tuple(x.shape), x._version, None if w is None else id(w))
            owner = self._seen.get(key)
            if owner is not None and owner != name:
                self.alias.setdefault(name, owner)
            elif name not in self.alias:
                self._seen[key] = name
                if name not in self.stats:
                    self.stats[name] = HessianStats(x.shape[-1], self.device)
                rows = x.reshape(-1, x.shape[-1]).shape[0]
                x_fp = self.fp_rows(name, self.batch, rows) if self.fp_rows is not None else None
                self.stats[name].add(x, w, routed, x_fp)
            self._maybe_stop(name)
        return hook

    def owner(self, name: str) -> str:
        return self.alias.get(name, name)

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
