"""Scores the QuantMoE-Bench heuristics rank by: weight outliers, expert frequency, block importance.

* Outlier score (QuantMoE-Bench Eq. 5, code ``dump-*-outlier-metric.py``): for a weight W (out, in),
  per input column j the ratio max_i |W_ij| / mean_i |W_ij|, and the score is the largest ratio over
  columns. Computed on the full-precision weights of every routed-expert linear.
* Expert frequency: tokens the router sends to each expert of a layer on the calibration data
  (counted by the profile pass); the top-K per layer are the most frequently routed.
* Block importance: ``1 - predicted cos(x, y)`` from the block-importance predictor
  (:mod:`.predictor`); the blocks whose outputs differ most from their inputs rank first.

All functions here are pure except :func:`outlier_scores`, which only reads weights.
"""

from __future__ import annotations

import torch

from ..models.adapter import ModelAdapter


def outlier_score(W: torch.Tensor) -> float:
    """max_j ( max_i |W_ij| / mean_i |W_ij| ) for W (out, in); an all-zero column scores 0."""
    A = W.detach().float().abs()  # (out, in)
    col_max = A.amax(0)  # (in,)
    col_mean = A.mean(0)  # (in,)
    ratio = torch.where(col_mean > 0, col_max / col_mean.clamp_min(1e-30), torch.zeros_like(col_max))  # (in,)
    return float(ratio.max())


def outlier_scores(adapter: ModelAdapter, roles: tuple[str, ...] = ("expert",)) -> dict[str, float]:
    """{linear name: outlier score} for the linears of the given roles (adapter must be unfused)."""
    return {li.name: outlier_score(adapter.module(li.name).weight) for li in adapter.linears() if li.role in roles}


def top_experts(counts: list[int], k: int) -> list[int]:
    """Indices of the k most frequently routed experts (ties: lower index first)."""
    if k > len(counts):
        raise ValueError(f"asked for the top {k} experts of a layer with {len(counts)}; use a smaller count")
    return sorted(range(len(counts)), key=lambda e: (-counts[e], e))[:k]


def importance_ranking(importance: dict[int, float]) -> list[int]:
    """Blocks by importance, most important first (ties: lower block first)."""
    return sorted(importance, key=lambda b: (-importance[b], b))
