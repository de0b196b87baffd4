"""EBSS: Expert-Balanced Self-Sampling (MoEQuant, Hu et al. 2025, Sec. 4.1; METHODS.md 1.2).

The model writes its own calibration set. Each sequence starts from a random token and grows by a
width-w beam search whose cost for extending a beam S (l tokens) by token v is

    cost(S + v) = -(R_S + log P(v | S)) / (l + 1) + sigma(S) / tau

R_S is the beam's cumulative log-probability and sigma(S) its expert-balance deviation: per MoE layer
the sample std (1/(E-1)) of the normalised top-k expert frequencies over S's tokens, averaged over
layers. The w *lowest*-cost children survive (the paper's "argmax" is a sign slip, METHODS.md). The
balance term is the parent's ("deferred imbalance"): a token's routing is known once it is fed in.

Speed: all sequences x beams advance together as one batch with a KV cache. Children of one parent
share sigma(S) and have the same length, so the global best w are always among each parent's w most
likely tokens: only those are expanded (exactly equivalent to scoring the whole vocabulary; tested).
EOS and special tokens are never generated; sequences stop at the fixed length.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch

from ..models.adapter import ModelAdapter
from ..models.moe import RoutingTap
from ..utils.dist import Dist
from ..utils.progress import progress


@dataclass(frozen=True)
class EBSSConfig:
    num: int = 128  # sequences
    length: int = 512  # tokens per sequence (including the random first token)
    width: int = 4  # beams per sequence
    tau: float = 1.2  # temperature of the balance term
    seed: int = 0
    batch: int = 32  # sequences generated together (x width rows per forward)
    full_expansion: bool = False  # score every vocabulary token (slow; for checking the shortcut)
    no_repeat_ngram: int = 0  # > 1: a beam never repeats one of its n-grams (0 = off, as in the paper)

    def __post_init__(self):
        for bad, what in ((self.num < 1, f"--num (or --nsamples) must be >= 1, got {self.num}"),
                          (self.length < 2, f"--length (or --seqlen) must be >= 2, got {self.length}"),
                          (self.width < 1, f"--width (or --ebss-width) must be >= 1, got {self.width}"),
                          (not self.tau > 0, f"--tau (or --ebss-tau) must be > 0, got {self.tau}"),
                          (self.batch < 1, f"--batch must be >= 1, got {self.batch}"),
                          (self.no_repeat_ngram == 1 or self.no_repeat_ngram < 0,
                           f"--no-repeat-ngram (or --ebss-no-repeat-ngram) must be 0 (off) or >= 2, "
                           f"got {self.no_repeat_ngram}")):
            if bad:
                raise ValueError(f"EBSS: {what}")


def sequence_sigma(counts: torch.Tensor) -> torch.Tensor:
    """Balance deviation per row from expert counts (rows, L_moe, E) -> (rows,)."""
    c = counts.float()
    freq = c / c.sum(-1, keepdim=True).clamp_min(1)  # (rows, L, E)
    return freq.std(-1, unbiased=True).mean(-1)  # (rows,)


def newest_counts(tap: RoutingTap, rows: int, num_experts: int) -> torch.Tensor:
    """Expert counts of the newest token of each row from the tap's last forward: (rows, L_moe, E)."""
    out = []
    for i in sorted(tap.last):
        idx = tap.last[i][0].reshape(rows, -1)  # (rows, k)
        out.append(torch.zeros(rows, num_experts, dtype=torch.long, device=idx.device).scatter_add_(
            1, idx, torch.ones_like(idx)))
    return torch.stack(out, 1)  # (rows, L_moe, E)


def _forbidden(tokenizer, vocab: int) -> torch.Tensor:
    bad = torch.zeros(vocab, dtype=torch.bool)
    ids = set(tokenizer.all_special_ids or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for i in ids:
        if 0 <= i < vocab:
            bad[i] = True
    return bad


def _repeats(ids: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """Tokens that would complete an n-gram a row already contains: ids (B, l) -> mask (B, V)."""
    grams = ids.unfold(1, n, 1)  # (B, l - n + 1, n)
    hit = (grams[:, :, :-1] == ids[:, None, ids.shape[1] - (n - 1):]).all(-1)  # (B, l - n + 1)
    rows, pos = hit.nonzero(as_tuple=True)
    mask = torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device)
    mask[rows, grams[rows, pos, -1]] = True
    return mask


@torch.inference_mode()
def _generate_batch(model, tap: RoutingTap, first: torch.Tensor, cfg: EBSSConfig, bad: torch.Tensor,
                    device, bar) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Beam-search S sequences from their first tokens (S,). -> ids (S, L), mean NLL (S,), sigma (S,)."""
    from transformers import DynamicCache

    S, w, L = first.shape[0], cfg.width, cfg.length
    B = S * w
    ids = first.to(device).repeat_interleave(w)[:, None]  # (B, 1)
    R = torch.zeros(B, dtype=torch.float64, device=device)  # cumulative log-prob
    E = tap.adapter.num_experts
    counts = torch.zeros(B, len(tap.adapter.moe_blocks()), E, dtype=torch.long, device=device)
    alive = torch.zeros(S, w, dtype=torch.bool, device=device)
    alive[:, 0] = True  # the w rows of a sequence start as copies: only one is a real beam
    alive = alive.reshape(B)
    cache = DynamicCache()
    base = torch.arange(S, device=device)[:, None] * w  # (S, 1) first row of each sequence
    bad = bad.to(device)
    for t in range(L - 1):
        out = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
        counts += newest_counts(tap, B, E)
        sigma = sequence_sigma(counts)  # (B,) of the parent beams, their newest token included
        logp = torch.log_softmax(out.logits[:, -1].float(), -1).double()  # (B, V)
        logp[:, bad] = float("-inf")
        l = t + 1  # current length; children have l + 1 tokens
        if cfg.no_repeat_ngram and l >= cfg.no_repeat_ngram:
            logp[_repeats(ids, cfg.no_repeat_ngram, logp.shape[1])] = float("-inf")
        if cfg.full_expansion:
            cand_lp, cand_tok = logp, None
        else:
            cand_lp, cand_tok = logp.topk(w, dim=-1)  # (B, w): each parent's w most likely tokens
        cost = -(R[:, None] + cand_lp) / (l + 1) + (sigma.double() / cfg.tau)[:, None]  # (B, K)
        cost[~alive] = float("inf")
        K = cost.shape[1]
        best = cost.view(S, w * K).topk(w, dim=-1, largest=False).indices  # (S, w) lowest costs
        parent = (base + best // K).reshape(B)  # (B,) global parent row of each surviving child
        choice = (best % K).reshape(B)
        tok = choice if cand_tok is None else cand_tok[parent, choice]  # (B,)
        R = R[parent] + logp[parent, tok]
        counts = counts[parent]
        cache.reorder_cache(parent)
        ids = torch.cat([ids[parent], tok[:, None]], 1)  # (B, l + 1)
        alive = torch.isfinite(R)
        bar.update(S)
    model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)  # route the last token too
    counts += newest_counts(tap, B, E)
    sigma = sequence_sigma(counts)
    final = (-R / (L - 1) + sigma.double() / cfg.tau).view(S, w)
    pick = (base.squeeze(1) + final.argmin(-1))  # (S,) lowest-cost beam of each sequence
    return ids[pick].cpu(), (-R[pick] / (L - 1)).float().cpu(), sigma[pick].float().cpu()


def generate(model, tokenizer, cfg: EBSSConfig, device="cpu", dist: Dist = Dist()) -> tuple[list[dict], dict]:
    """Generate ``cfg.num`` EBSS sequences. -> (rows {input_ids, text, nll, balance_std}, stats). With several
    ranks each generates every world-th batch of ``cfg.batch`` sequences and all ranks get every row, in
    order: the single-process set (each batch is generated on its own)."""
    ad = ModelAdapter.for_model(model)
    if not ad.moe_blocks():
        raise ValueError("EBSS needs a mixture-of-experts model (this one has no MoE layers)")
    vocab = model.get_output_embeddings().weight.shape[0]
    bad = _forbidden(tokenizer, vocab)
    allowed = (~bad).nonzero().squeeze(1)
    g = torch.Generator().manual_seed(cfg.seed)
    first = allowed[torch.randint(0, allowed.numel(), (cfg.num,), generator=g)]  # random first tokens
    starts = list(range(0, cfg.num, cfg.batch))
    mine, per_batch, t0 = dist.mine(len(starts)), {}, time.perf_counter()
    total = sum(min(cfg.batch, cfg.num - starts[k]) for k in mine) * (cfg.length - 1)
    with RoutingTap(ad) as tap, progress(total=total, desc="EBSS", unit="tok") as bar:
        for k in mine:
            ids, nll, sig = _generate_batch(model, tap, first[starts[k]:starts[k] + cfg.batch], cfg, bad, device, bar)
            per_batch[k] = [{"input_ids": ids[r].tolist(), "text": tokenizer.decode(ids[r].tolist()),
                             "nll": round(float(nll[r]), 5), "balance_std": round(float(sig[r]), 6)}
                            for r in range(ids.shape[0])]
    got = {k: v for part in dist.gather(per_batch) for k, v in part.items()}
    rows = [row for k in sorted(got) for row in got[k]]
    secs = time.perf_counter() - t0
    stats = {"seconds": secs, "tokens": cfg.num * cfg.length, "tokens_per_s": cfg.num * cfg.length / secs,
             "config": asdict(cfg)}
    return rows, stats


def write_jsonl(rows: list[dict], path) -> None:
    from ..utils.fs import write_atomic

    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def cache_path(model_path: str, cfg: EBSSConfig):
    """Where an EBSS set for this model and these settings is cached ($MOEQ_CACHE or ~/.cache/moeq)."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha1()
    p = Path(model_path)
    for f in sorted(p.glob("*.json")) + sorted(p.glob("*.safetensors")) if p.is_dir() else []:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(str(p.resolve() if p.exists() else model_path).encode())
    settings = asdict(cfg)
    if not settings["no_repeat_ngram"]:  # off: the key of sets made before the option existed
        del settings["no_repeat_ngram"]
    h.update(json.dumps(settings, sort_keys=True).encode())
    from ..utils.fs import cache_root

    root = cache_root() / "ebss"
    return root / f"{p.name}-{h.hexdigest()[:16]}.jsonl"


def ebss_calibration(model, tokenizer, model_path: str, cfg: EBSSConfig, device="cpu",
                     dist: Dist = Dist()) -> tuple[torch.Tensor, dict]:
    """Token ids (num, length) of an EBSS set, generated once per model and settings and then reused (rank 0's
    cache decides for every rank, and only rank 0 writes it)."""
    path = cache_path(model_path, cfg)
    info = {"cache": str(path)}
    rows = dist.broadcast([json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                          if dist.main and path.is_file() else None)
    if rows is not None:
        info["reused"] = True
    else:
        rows, stats = generate(model, tokenizer, cfg, device, dist)
        if dist.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(rows, path)
        info.update(reused=False, **{k: v for k, v in stats.items() if k != "config"})
    return torch.tensor([r["input_ids"] for r in rows]), info
