"""Expert usage and the expert-balance metric (MoEQuant Eq. 4), measured on any token windows.

Usage counts come from the routing the model itself does (:class:`~moeq.models.moe.RoutingTap` reads
the ``top_k_index`` the router handed every layer's experts module; fused and per-expert layouts alike). Balance of a set: per MoE layer, normalise the top-k counts to frequencies that sum
to 1, take their sample standard deviation over experts (1/(E-1)), and average over MoE layers.
"""

from __future__ import annotations

import torch

from ..models.adapter import ModelAdapter
from ..models.moe import RoutingTap
from ..utils.progress import progress


def balance_std(counts: dict[int, list[int]] | list[list[int]]) -> float:
    """Mean over layers of the sample std of normalised expert frequencies (lower = more balanced)."""
    rows = list(counts.values()) if isinstance(counts, dict) else list(counts)
    stds = []
    for c in rows:
        f = torch.tensor(c, dtype=torch.float64)
        if f.sum() == 0 or len(f) < 2:
            continue
        f = f / f.sum()
        stds.append(float(f.std(unbiased=True)))
    return sum(stds) / len(stds) if stds else float("nan")


@torch.inference_mode()
def expert_usage(model, windows: torch.Tensor, batch_size: int = 8, desc: str = "routing") -> dict[int, list[int]]:
    """{block index: tokens routed to each expert} over windows (n, T) of token ids."""
    ad = ModelAdapter.for_model(model)
    counts = {i: torch.zeros(ad.num_experts, dtype=torch.long) for i in ad.moe_blocks()}

    def count(i, idx, w):  # idx (N, k) top_k_index
        counts[i] += torch.bincount(idx.reshape(-1).cpu(), minlength=ad.num_experts)[: ad.num_experts]
    dev = model.get_input_embeddings().weight.device
    with RoutingTap(ad, count):
        for s in progress(range(0, windows.shape[0], batch_size), desc=desc, unit="batch"):
            model(input_ids=windows[s:s + batch_size].to(dev), use_cache=False)
    return {i: c.tolist() for i, c in counts.items()}


def usage_summary(counts: dict[int, list[int]]) -> dict:
    """Per layer: min and max share relative to the uniform share 1/E, plus the balance std."""
    per_layer = {}
    for i, c in counts.items():
        total, E = sum(c), len(c)
        shares = [x / total * E for x in c] if total else [0.0] * E
        per_layer[i] = {"min_rel_share": min(shares), "max_rel_share": max(shares), "counts": c}
    return {"balance_std": balance_std(counts), "layers": per_layer}
