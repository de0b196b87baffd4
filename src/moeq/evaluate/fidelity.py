"""How faithfully a quantized MoE model behaves like its full-precision original, on evaluation text.

* Routing fidelity, per MoE layer: the fraction of tokens whose top-k expert *set* is unchanged, and
  the fraction whose top-1 expert (largest combine weight) is unchanged. Both models see the same
  token windows; each layer's routing is what the model actually does (errors upstream included).
* Output fidelity: mean over predicted tokens of KL(P_fp || P_quantized) of the next-token
  distributions, in nats.

Routing is read from the experts modules' inputs (top_k_index, top_k_weights), so it works for every
registry architecture and for fused and per-expert layouts alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.adapter import ModelAdapter
from ..models.moe import RoutingTap
from ..utils.progress import progress


def _recorder(model):
    """A routing tap keeping each MoE block's last (top-k index, weights) on CPU: (N, k), (N, k)."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    tap = RoutingTap(ModelAdapter.for_model(model),
                     lambda i, idx, w: seen.__setitem__(i, (idx.detach().cpu(), w.detach().float().cpu())))
    return tap, seen


def _agreement(a: tuple, b: tuple) -> tuple[int, int]:
    """(tokens with the same top-k set, tokens with the same top-1) between two routings."""
    (ia, wa), (ib, wb) = a, b
    same_set = (ia.sort(-1).values == ib.sort(-1).values).all(-1)  # (N,)
    top1_a = ia.gather(1, wa.argmax(-1, keepdim=True)).squeeze(1)
    top1_b = ib.gather(1, wb.argmax(-1, keepdim=True)).squeeze(1)
    return int(same_set.sum()), int((top1_a == top1_b).sum())


@torch.inference_mode()
def compare(fp_model, q_model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """Routing and output fidelity of ``q_model`` against ``fp_model`` over windows (n, T) of token ids."""
    (tap_fp, seen_fp), (tap_q, seen_q) = _recorder(fp_model), _recorder(q_model)
    blocks = ModelAdapter.for_model(fp_model).moe_blocks()
    same_set = {i: 0 for i in blocks}
    same_top1 = {i: 0 for i in blocks}
    tokens, kl_sum, kl_n = 0, 0.0, 0
    with tap_fp, tap_q:
        for s in progress(range(0, windows.shape[0], batch_size), desc="fidelity", unit="batch"):
            ids = windows[s:s + batch_size]
            lp_fp = F.log_softmax(fp_model(input_ids=ids.to(fp_model.device)).logits.float(), -1).cpu()  # (b, T, V)
            lp_q = F.log_softmax(q_model(input_ids=ids.to(q_model.device)).logits.float(), -1).cpu()
            kl = (lp_fp.exp() * (lp_fp - lp_q)).sum(-1)  # (b, T)
            kl_sum += float(kl.double().sum())
            kl_n += kl.numel()
            tokens += ids.numel()
            for i in blocks:
                a, b = _agreement(seen_fp[i], seen_q[i])
                same_set[i] += a
                same_top1[i] += b
    layers = {i: {"topk_set_agreement": same_set[i] / tokens, "top1_agreement": same_top1[i] / tokens}
              for i in blocks}
    n = max(1, len(layers))
    return {
        "routing": layers,
        "mean_topk_set_agreement": sum(v["topk_set_agreement"] for v in layers.values()) / n if layers else None,
        "mean_top1_agreement": sum(v["top1_agreement"] for v in layers.values()) / n if layers else None,
        "kl_fp_to_quantized": kl_sum / max(1, kl_n),
        "tokens": tokens,
    }
