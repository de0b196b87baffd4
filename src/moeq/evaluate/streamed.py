"""Perplexity of a model that does not fit in memory: the evaluation windows go through the one block loop.

The windows' embeddings are captured once, every block is loaded, run on all windows and freed
(:func:`moeq.capture.loop.run_blocks`, activations placed by the same budget as calibration), then
the final norm and lm_head score every window: the numbers ``evaluate_ppl`` gives for the same model
in memory (tested), at the memory cost of one block plus the activations. Downstream tasks need
the whole model (lm-evaluation-harness drives it) and are refused for models this path serves.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from ..capture.activations import Activations
from ..capture.loop import run_blocks
from ..utils.dist import Dist
from .perplexity import WINDOWS, Windows


@torch.no_grad()
def streamed_window_nll(source, ids: torch.Tensor, batch_size: int, placement: str = "auto",
                        folder: Path | None = None, desc: str = "ppl", dist: Dist = Dist()) -> torch.Tensor:
    """Summed NLL (nats) of tokens 1..T-1 of each window (n, T) -> (n,), block by block (with several
    ranks each runs every world-th batch; every rank gets all windows' NLL)."""
    batches = list(ids.split(batch_size))
    mine = dist.mine(len(batches))
    if not mine:  # more ranks than batches: this rank only takes part in the gather
        return _merged(dist.gather({}))
    source.load_embeddings()
    try:
        acts = Activations.capture(source.adapter.model, source.adapter.blocks[0], [batches[k] for k in mine],
                                   source.device, placement, folder, what="evaluation")
    finally:
        source.release_embeddings()
    acts = run_blocks(source, acts, through_last=True, desc=f"{desc} blocks")
    norm, head = source.load_head()
    out = []
    try:
        for (h, _), win in zip(acts, [batches[k] for k in mine]):
            logits = head(norm(h.to(source.device))).float()  # (b, T, V)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), win[:, 1:].flatten().to(logits.device),
                                  reduction="none")
            out.append(nll.view(win.shape[0], -1).sum(-1).cpu())  # (b,)
    finally:
        source.release_head()
        if folder is not None:  # a folder of its own, for these activations only
            shutil.rmtree(folder, ignore_errors=True)
    return _merged(dist.gather(dict(zip(mine, out))))


def _merged(parts: list[dict]) -> torch.Tensor:
    """Every rank's {batch index: NLL (b,)} -> NLL of all windows in batch order (n,)."""
    got = {k: v for part in parts for k, v in part.items()}
    return torch.cat([got[k] for k in sorted(got)])


def streamed_ppl(source, tokenizer, datasets, seqlen: int, data_dir=None, windows_cache: dict | None = None,
                 limit: int | None = None, label: str = "", placement: str = "auto",
                 folder: Path | None = None, dist: Dist = Dist()) -> dict:
    """{name: {"ppl", "bpb", ...}} like :func:`moeq.evaluate.perplexity.evaluate_ppl`, streamed."""
    out = {}
    vocab = int(getattr(source.adapter.config, "vocab_size", 32000))
    batch_size = max(1, min(16, (512 << 20) // (seqlen * vocab * 4)))  # logits (b, T, V) around 512 MiB
    for name in datasets:
        if name not in WINDOWS:
            raise ValueError(f"unknown perplexity dataset {name!r}; choose from {', '.join(WINDOWS)}")
        key = (name, seqlen)
        w = (windows_cache or {}).get(key) or WINDOWS[name](tokenizer, seqlen, data_dir=data_dir)
        if windows_cache is not None:
            windows_cache[key] = w
        if limit is not None:
            w = Windows(w.ids[:limit], w.nbytes[:limit], w.name, w.origin)
        total = float(streamed_window_nll(source, w.ids, batch_size, placement, folder,
                                          f"{label} {name}".strip(), dist).double().sum())
        n, T = w.ids.shape
        tokens, nbytes = n * (T - 1), int(w.nbytes.sum())
        out[name] = {"ppl": math.exp(total / tokens), "bpb": total / math.log(2) / nbytes, "nll": total / tokens,
                     "windows": n, "seqlen": T, "tokens": tokens, "bytes": nbytes, "streamed": True}
    return out
