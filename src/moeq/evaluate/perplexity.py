"""Token perplexity the way the GPTQ / MoEQuant papers compute it, plus bits per byte.

* WikiText-2: the test split's lines joined with "\\n\\n", tokenized once, cut into non-overlapping
  windows of ``seqlen`` tokens (the tail shorter than a window is dropped).
* C4: 256 windows of ``seqlen`` tokens drawn with ``random.seed(0)`` from validation documents that
  are longer than ``seqlen`` tokens (GPTQ's ``c4`` procedure).

Each window is scored independently; ppl = exp(mean NLL over all predicted tokens). Bits per byte =
total NLL / ln 2 / UTF-8 bytes of the text those predicted tokens cover, which does not depend on
the tokenizer and so compares models with different vocabularies.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..calib.sources import load_text
from ..utils.dist import Dist
from ..utils.progress import progress


@dataclass
class Windows:
    """Evaluation windows and the number of text bytes covered by each window's predicted tokens."""

    ids: torch.Tensor  # (n, seqlen) long
    nbytes: torch.Tensor  # (n,) long
    name: str
    origin: str


def _byte_ends(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """UTF-8 byte offset of the end of every token (from char offsets)."""
    char_bytes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = np.where(char_bytes < 0x80, 1, np.where(char_bytes < 0x800, 2, np.where(char_bytes < 0x10000, 3, 4)))
    cum = np.concatenate([[0], np.cumsum(width)])  # (chars+1,) byte offset of each char boundary
    ends = np.fromiter((e for _, e in offsets), dtype=np.int64, count=len(offsets))
    return cum[ends]


def _encode(tokenizer, text: str):
    # long texts are tokenized in one call on purpose: verbose=False silences the "longer than
    # model_max_length" warning without touching the caller's tokenizer
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True, verbose=False)
    return enc["input_ids"], _byte_ends(text, enc["offset_mapping"])


def wikitext2_windows(tokenizer, seqlen: int, data_dir=None) -> Windows:
    src = load_text("wikitext2", "test", data_dir)
    ids, ends = _encode(tokenizer, src.joined())
    n = len(ids) // seqlen
    if n == 0:
        raise ValueError(f"seqlen {seqlen} is longer than the WikiText-2 test text ({len(ids)} tokens)")
    t = torch.tensor(ids[: n * seqlen]).view(n, seqlen)
    nbytes = [int(ends[(i + 1) * seqlen - 1] - ends[i * seqlen]) for i in range(n)]
    return Windows(t, torch.tensor(nbytes), "wikitext2", src.origin)


def c4_windows(tokenizer, seqlen: int, n: int = 256, seed: int = 0, data_dir=None) -> Windows:
    src = load_text("c4", "validation", data_dir)
    rng = random.Random(seed)
    cache: dict[int, tuple] = {}
    rows, nbytes = [], []
    for _ in range(n):
        for _attempt in range(100000):
            i = rng.randint(0, len(src.docs) - 1)
            if i not in cache:
                cache[i] = _encode(tokenizer, src.docs[i])
            ids, ends = cache[i]
            if len(ids) > seqlen:
                break
        else:
            raise ValueError(f"no C4 validation document is longer than seqlen={seqlen} tokens")
        j = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[j: j + seqlen])
        nbytes.append(int(ends[j + seqlen - 1] - ends[j]))
    return Windows(torch.tensor(rows), torch.tensor(nbytes), "c4", src.origin)


WINDOWS = {"wikitext2": wikitext2_windows, "c4": c4_windows}


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL (nats) of tokens 1..T-1 of each window given its prefix. ids (b, T) -> (b,)."""
    logits = model(input_ids=ids.to(model.device)).logits.float()  # (b, T, V)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten().to(logits.device), reduction="none")
    return nll.view(ids.shape[0], -1).sum(-1).cpu()  # (b,)


def perplexity(model, windows: Windows, batch_size: int | None = None, desc: str = "", dist: Dist = Dist()) -> dict:
    """Perplexity and bits per byte of ``model`` over ``windows``. With several ranks each scores every
    world-th batch and the per-batch sums are added in batch order: the single-process figure."""
    n, T = windows.ids.shape
    if batch_size is None:  # keep logits (b, T, V) around 128 MiB (the loss takes about three times that)
        vocab = int(getattr(model.config, "vocab_size", 32000))
        batch_size = max(1, min(16, (128 << 20) // (T * vocab * 4)))
    starts = list(range(0, n, batch_size))
    sums = {k: window_nll(model, windows.ids[starts[k]: starts[k] + batch_size]).double().sum()
            for k in progress(dist.mine(len(starts)), desc=desc or f"ppl {windows.name}", unit="batch")}
    total = torch.zeros((), dtype=torch.float64)
    for k, v in sorted(kv for part in dist.gather(sums) for kv in part.items()):
        total += v
    tokens = n * (T - 1)
    nbytes = int(windows.nbytes.sum())
    return {
        "ppl": math.exp(total.item() / tokens),
        "bpb": total.item() / math.log(2) / nbytes,
        "nll": total.item() / tokens,
        "windows": n,
        "seqlen": T,
        "tokens": tokens,
        "bytes": nbytes,
    }


def default_seqlen(model_or_config, requested: int | None = None, flag: str = "--seqlen") -> int:
    """The papers' 2048, capped by the model's context; an explicit request must fit the context. Takes a
    model or its config (check lengths before loading any weight); ``flag`` names the culprit in errors."""
    config = getattr(model_or_config, "config", model_or_config)
    ctx = int(getattr(config, "max_position_embeddings", 2048) or 2048)
    if requested is None:
        return min(2048, ctx)
    if requested < 2:
        raise ValueError(f"{flag} must be at least 2, got {requested}")
    if requested > ctx:
        raise ValueError(f"{flag} {requested} is longer than the model's context ({ctx} positions); "
                         f"use {flag} <= {ctx}")
    return requested


def evaluate_ppl(model, tokenizer, datasets=("wikitext2",), seqlen: int | None = None, data_dir=None,
                 windows_cache: dict | None = None, label: str = "", limit: int | None = None, dist: Dist = Dist()) -> dict:
    """{name: {"ppl", "bpb", ...}} for each dataset; ``windows_cache`` lets FP and quantized runs share windows.
    ``limit`` keeps only the first N windows (quick checks; the papers' numbers use all of them)."""
    seqlen = default_seqlen(model, seqlen)
    out = {}
    for name in datasets:
        if name not in WINDOWS:
            raise ValueError(f"unknown perplexity dataset {name!r}; choose from {', '.join(WINDOWS)}")
        key = (name, seqlen)
        if windows_cache is not None and key in windows_cache:
            w = windows_cache[key]
        else:
            w = WINDOWS[name](tokenizer, seqlen, data_dir=data_dir)
            if windows_cache is not None:
                windows_cache[key] = w
        if limit is not None:
            w = Windows(w.ids[:limit], w.nbytes[:limit], w.name, w.origin)
        out[name] = perplexity(model, w, desc=f"{label} ppl {name}".strip(), dist=dist)
    return out
