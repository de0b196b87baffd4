"""Block gains: how much one unit of local output error in a block costs the model's loss, per width.

The profiled sensitivity of a linear (:mod:`.sensitivity`) is the squared output error it adds *where it
lands*. Summing those across blocks treats an error in the first block like one in the last, but the
first block's error travels through every later block and the output weighs each block differently (on
the bundled models, keeping the first MoE block at 4 bits helps far more than its local errors suggest).
A gain per block, part (attention; FFN = routed + shared experts + dense MLP) and candidate width
calibrates this:

    gain[b, part, w] = KL(quantize only that part of block b, RTN at width w)
                       / sum over its linears of tr(D H_imp D^T)   (D = that RTN error, H_imp as for sensitivity)

KL is measured end to end: the mean per-token KL divergence from the full-precision model's next-token
distribution to the perturbed model's, on the first ``samples`` calibration sequences. It is the
expected NLL increase when the FP model is right and is never negative; measured NLL differences of
single parts at 3-4 bits came out of either sign on the bundled models. The calibrated sensitivity of a
linear at width w is gain[b, part, w] x its local sensitivity at w (then made non-increasing in w), so the
search minimises a prediction of the output KL (nats per token) that matches the measured one for each
part at each width, and the predicted error of a plan reads in those units. (On the bundled models the
gains differ about 10x between blocks and little between widths.)

Cost: one forward of ``samples`` sequences per (block, part, width), i.e. 2 x blocks x widths model
forwards on a small subset, plus one FP forward; it needs the whole model on one device (the profile skips
gains for a model onloaded block by block). A (part, width) whose KL
rounds to 0 gets the smallest positive gain of that width.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..models.adapter import ModelAdapter
from ..quant.primitives import QuantArgs, fake_quantize, hessian_error
from ..utils.progress import progress
from .modules import ModuleRecord

PARTS = {"attn": "attn", "expert": "ffn", "shared": "ffn", "dense_mlp": "ffn"}


PartKey = tuple[int, str, int]  # (block, "attn" | "ffn", bits)


def part_key(record: ModuleRecord, bits: int) -> PartKey:
    """The gain a linear uses at a width: (block, "attn" or "ffn", bits)."""
    return record.block, PARTS[record.role], bits


def rtn_local_error(W: torch.Tensor, H_imp: torch.Tensor | None, args: QuantArgs, scale_dtype) -> float:
    """tr(D H_imp D^T) for D the RTN error of W (out, in) at ``args`` (0 without statistics)."""
    if H_imp is None:
        return 0.0
    D = fake_quantize(W.float(), args, scale_dtype).to(H_imp.device) - W.float().to(H_imp.device)  # (out, in)
    return float(hessian_error(D, H_imp))


@torch.no_grad()
def block_gains(adapter: ModelAdapter, records: dict[str, ModuleRecord], local: dict[int, dict[str, float]],
                ids: torch.Tensor, template: QuantArgs, scale_dtype, batch_size: int) -> dict[PartKey, dict]:
    """{(block, part, bits): {"gain", "kl", "local_error"}} measured on ids (n, T); ``local[bits]``
    holds each linear's rtn_local_error at that width (group size and symmetry of ``template``). The
    model must be unfused (per-expert linears) and is left exactly as it was. Batch by batch: the FP
    log-probabilities of one batch are kept while every (part, width) perturbation is applied, scored
    and undone, so memory holds one batch of logits."""
    model = adapter.model
    dev = next(model.parameters()).device
    parts: dict[PartKey, list[str]] = {}
    for bits in local:
        for name, rec in records.items():
            parts.setdefault(part_key(rec, bits), []).append(name)
    kl = dict.fromkeys(parts, 0.0)
    count = 0
    for batch in progress(ids.split(batch_size), desc="block gains", unit="batch", leave=False):
        batch = batch.to(dev)  # (b, T)
        fp = torch.log_softmax(model(input_ids=batch).logits.float(), -1)  # (b, T, V)
        count += batch.numel()
        for key, names in parts.items():
            args = replace(template, num_bits=key[2])
            saved = {}
            try:
                for n in names:
                    w = adapter.module(n).weight
                    saved[n] = w.data.clone()
                    w.data.copy_(fake_quantize(w.data.float(), args, scale_dtype).to(w.dtype))
                q = torch.log_softmax(model(input_ids=batch).logits.float(), -1)  # (b, T, V)
                kl[key] += float((fp.exp() * (fp - q)).sum())
            finally:
                for n, w0 in saved.items():
                    adapter.module(n).weight.data.copy_(w0)
    out = {}
    for key, names in parts.items():
        bits = key[2]
        d, err = kl[key] / max(1, count), sum(local[bits].get(n, 0.0) for n in names)
        out[key] = {"kl": d, "local_error": err, "gain": d / err if d > 0 and err > 0 and math.isfinite(d) else None}
    for bits in local:
        same = [v for k, v in out.items() if k[2] == bits]
        positive = [v["gain"] for v in same if v["gain"] is not None]
        floor = min(positive) if positive else 0.0
        for v in same:
            if v["gain"] is None:
                v["gain"] = floor
    return out
