"""Train one of moeq's bundled MoE language models from scratch on ../shared/data/train_corpus.

This script is how the checkpoints under ``src/moeq/bundled/`` were made. It is seeded and
reproducible on CPU: it (1) cleans the training corpus (Project Gutenberg headers, WikiExtractor
tags, BOMs), (2) trains a byte-level BPE tokenizer (shared by all bundled models, trained once),
(3) trains a transformers MoE model of the requested class with the router load-balancing loss,
and (4) saves a standard HF checkpoint (config.json, model.safetensors in bf16, tokenizer) plus
``train_log.json`` with the figures the model card quotes.

No WikiText-2 or C4 text is used (see train_corpus/SOURCES.md for the contamination checks).

Usage:
    python scripts/train_bundled_model.py --arch qwen2_moe --out src/moeq/bundled/qwen2-moe-tiny
    python scripts/train_bundled_model.py --arch mixtral   --out src/moeq/bundled/mixtral-tiny
    python scripts/train_bundled_model.py --arch deepseek_v3 --out src/moeq/bundled/deepseek-v3-tiny
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

SPECIAL = "<|endoftext|>"

# Architecture configs: hidden/intermediate sizes are multiples of 128 so group size 128 applies.
CONFIGS = {
    "qwen2_moe": dict(
        cls="Qwen2MoeConfig",
        kwargs=dict(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=512, moe_intermediate_size=128, shared_expert_intermediate_size=512,
            num_experts=16, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1,
            router_aux_loss_coef=0.0, output_router_logits=True, qkv_bias=True,
            max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
            rms_norm_eps=1e-6, use_sliding_window=False,
        ),
    ),
    "mixtral": dict(
        cls="MixtralConfig",
        kwargs=dict(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
            router_aux_loss_coef=0.0, output_router_logits=True,
            max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
            rms_norm_eps=1e-6, sliding_window=None,
        ),
    ),
    # DeepSeek-MoE class: first block dense, 2 shared experts, 32 fine-grained routed experts, top-6
    # (DeepSeek-V3's sigmoid router and MLA attention); 3 blocks keep it under 24 MiB with the shared vocabulary
    "deepseek_v3": dict(
        cls="DeepseekV3Config",
        kwargs=dict(
            hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=512, moe_intermediate_size=128, n_shared_experts=2, n_routed_experts=32,
            num_experts_per_tok=6, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
            routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=128, qk_rope_head_dim=32,
            qk_nope_head_dim=64, v_head_dim=64, router_aux_loss_coef=0.0, output_router_logits=True,
            max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
        ),
    ),
}


# ----------------------------------------------------------------------------- corpus
def _clean_gutenberg(text: str) -> str:
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"\*\*\*\s*START OF[^\n]*\n", text)
    if start:
        text = text[start.end():]
    end = re.search(r"\n[^\n]*\*\*\*\s*END OF", text)
    if end:
        text = text[: end.start()]
    return text.strip()


def _wiki_docs(text: str) -> list[str]:
    docs = []
    for block in re.findall(r"<doc[^>]*>\n(.*?)</doc>", text, flags=re.S):
        body = block.strip()
        if body.count("\n") >= 2:  # skip title-only stubs
            docs.append(body)
    return docs


def load_corpus(root: Path) -> list[str]:
    """All training documents, cleaned, in a fixed order."""
    docs: list[str] = []
    for f in sorted((root / "wikipedia_en").glob("*.txt")):
        docs += _wiki_docs(f.read_text(encoding="utf-8"))
    for f in sorted((root / "gutenberg").glob("*.txt")):
        text = _clean_gutenberg(f.read_text(encoding="utf-8", errors="replace"))
        # split books into ~20k-character chunks on paragraph boundaries so windows mix sources
        paras, cur = text.split("\n\n"), []
        for p in paras:
            cur.append(p)
            if sum(len(c) for c in cur) > 20000:
                docs.append("\n\n".join(cur))
                cur = []
        if cur:
            docs.append("\n\n".join(cur))
    for f in sorted((root / "tinystories").glob("*.txt")):
        docs += [s.strip() for s in f.read_text(encoding="utf-8").split("\n\n") if s.strip()]
    for f in sorted((root / "shakespeare").glob("*.txt")):
        docs.append(f.read_text(encoding="utf-8"))
    for f in sorted((root / "code_python").glob("*.txt")):
        docs += [d.strip() for d in f.read_text(encoding="utf-8").split("# ===== FILE:") if d.strip()]
    return docs


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str], out: Path, vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    sample = rng.sample(docs, k=min(len(docs), 20000))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[SPECIAL], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(sample, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=None, pad_token=SPECIAL,
        model_max_length=512,
    )
    fast.save_pretrained(out)
    return fast


def encode_corpus(tok, docs: list[str], cache: Path) -> np.ndarray:
    if cache.exists():
        return np.load(cache)
    eos = tok.convert_tokens_to_ids(SPECIAL)
    ids: list[int] = []
    batch = 2000
    for i in range(0, len(docs), batch):
        for row in tok(docs[i:i + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    arr = np.asarray(ids, dtype=np.uint16)
    np.save(cache, arr)
    return arr


# ----------------------------------------------------------------------------- training
def build_model(arch: str, vocab_size: int, eos_id: int):
    import transformers

    spec = CONFIGS[arch]
    cfg = getattr(transformers, spec["cls"])(
        vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, **spec["kwargs"]
    )
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss E * sum_e f_e P_e computed *per layer* and averaged (1.0 when
    balanced). transformers' built-in aux loss pools all layers' logits together, which lets one layer
    starve an expert as long as another layer overuses it; balancing each layer keeps every expert alive."""
    losses = []
    for lg in router_logits:
        p = torch.softmax(lg.float(), dim=-1)  # (N, E)
        E = p.shape[-1]
        top = p.topk(top_k, dim=-1).indices  # (N, k)
        f = torch.zeros_like(p).scatter_(1, top, 1.0).mean(0) / top_k  # fraction of assignments (E,)
        losses.append(E * (f * p.mean(0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def revive_dead_experts(model, batches, top_k: int, threshold: float, seed: int) -> list[dict]:
    """Split overloaded experts into starved ones: every expert of a layer that gets less than ``threshold``
    of its uniform share of the top-k assignments on ``batches`` becomes a copy of the layer's busiest
    (not yet split) expert, FFN weights and router row, with a little noise on the router row so the two
    copies drift apart under further training. A dead expert gets almost no gradient from the balance loss
    (its probability is ~0), so splitting is what brings it back. -> the list of splits made."""
    model.eval()
    counts = None
    for x in batches:
        logits = model(input_ids=x, output_router_logits=True).router_logits  # per layer (N, E)
        c = torch.stack([torch.zeros(lg.shape[-1]).index_add_(0, lg.float().topk(top_k, -1).indices.flatten(),
                                                               torch.ones(lg.shape[0] * top_k)) for lg in logits])
        counts = c if counts is None else counts + c  # (L, E)
    model.train()
    g = torch.Generator().manual_seed(seed)
    splits = []
    layers = [(li, blk.mlp) for li, blk in enumerate(model.model.layers) if hasattr(blk.mlp, "experts")]  # MoE only
    for (li, mlp), c in zip(layers, counts):
        share = c / c.sum() * c.numel()  # (E,) load as a multiple of the uniform share
        donors = [int(e) for e in share.argsort(descending=True)]
        for dead in [int(e) for e in (share < threshold).nonzero().flatten()]:
            donor = donors.pop(0)
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(mlp.experts, name)  # (E, out, in)
                w[dead] = w[donor]
            r = mlp.gate.weight  # (E, hidden)
            r[dead] = r[donor] + 0.01 * r[donor].std() * torch.randn(r.shape[1], generator=g)
            splits.append({"layer": li, "dead": dead, "dead_share": round(float(share[dead]), 4),
                           "donor": donor, "donor_share": round(float(share[donor]), 4)})
    return splits


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(CONFIGS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=os.environ.get("MOEQ_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    ap.add_argument("--tokenizer", default=None, help="reuse this tokenizer dir instead of training one")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cache", default="/tmp/moeq_train_cache")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for matmuls (CPU with AVX512-BF16)")
    ap.add_argument("--init", default=None,
                    help="continue training from this checkpoint dir (same arch and tokenizer) instead of random init")
    ap.add_argument("--revive", type=float, default=0.0,
                    help="before training, split the busiest expert into every expert below this fraction of its "
                         "uniform share (e.g. 0.2; measured on 8 training batches)")
    ap.add_argument("--balance-coef", type=float, default=0.02, help="per-layer load-balancing loss weight")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    docs = load_corpus(Path(args.data) / "train_corpus")
    rng = random.Random(args.seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    n_val = max(50, len(docs) // 200)
    val_docs = [docs[i] for i in order[:n_val]]
    train_docs = [docs[i] for i in order[n_val:]]

    import transformers
    from transformers import AutoTokenizer

    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        tok.save_pretrained(out)
    else:
        tok = train_tokenizer(train_docs, out, args.vocab_size, args.seed)
    tag = f"{len(tok)}_{args.seed}"
    train_ids = torch.from_numpy(encode_corpus(tok, train_docs, cache / f"train_{tag}.npy").astype(np.int64))
    val_ids = torch.from_numpy(encode_corpus(tok, val_docs, cache / f"val_{tag}.npy").astype(np.int64))
    print(f"corpus: {len(train_docs)} train docs, {train_ids.numel():,} train tokens, "
          f"{val_ids.numel():,} val tokens; prep {time.time() - t0:.0f}s", flush=True)

    eos_id = tok.convert_tokens_to_ids(SPECIAL)
    if args.init:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = 0.0
        assert model.config.model_type == args.arch, f"--init is a {model.config.model_type}, not {args.arch}"
    else:
        model = build_model(args.arch, len(tok), eos_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.arch}: {n_params:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    T, B = args.seqlen, args.batch

    def batch_from(ids: torch.Tensor, g: torch.Generator):
        starts = torch.randint(0, ids.numel() - T - 1, (B,), generator=g)
        return torch.stack([ids[s:s + T] for s in starts.tolist()])  # (B, T)

    @torch.no_grad()
    def val_loss(n_batches=8):
        model.eval()
        g = torch.Generator().manual_seed(1234)
        losses = [model(input_ids=(x := batch_from(val_ids, g)), labels=x).loss.item() for _ in range(n_batches)]
        model.train()
        return sum(losses) / len(losses)

    log = {"arch": args.arch, "params": n_params, "steps": args.steps, "batch": B, "seqlen": T, "lr": args.lr,
           "seed": args.seed, "threads": torch.get_num_threads(), "train_tokens_available": train_ids.numel(),
           "bf16": args.bf16, "tokenizer": args.tokenizer or "trained by this run",
           "balance_coef": args.balance_coef, "warmup": args.warmup, "init": args.init or "random",
           "curve": []}
    if args.init and (Path(args.init) / "train_log.json").exists():  # lineage: what the init had been through
        log["init_log"] = json.loads((Path(args.init) / "train_log.json").read_text())
    if args.revive:
        g_rev = torch.Generator().manual_seed(args.seed + 1)
        log["revived"] = revive_dead_experts(model, [batch_from(train_ids, g_rev) for _ in range(8)],
                                             model.config.num_experts_per_tok, args.revive, args.seed)
        print(f"revived experts: {log['revived']}", flush=True)
    model.train()
    t_train = time.time()
    ema = None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x = batch_from(train_ids, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            outp = model(input_ids=x, labels=x)
        bal = balance_loss(outp.router_logits, model.config.num_experts_per_tok)
        loss = outp.loss + args.balance_coef * bal  # model's aux coef is 0: outp.loss is the LM loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lm = outp.loss.item()
        ema = lm if ema is None else 0.98 * ema + 0.02 * lm
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f"step {step:5d} lm_loss {lm:.3f} (ema {ema:.3f}) balance {bal.item():.3f} "
                  f"{el / (step + 1):.2f}s/step elapsed {el / 60:.1f}min", flush=True)
        if step % 500 == 0 or step == args.steps - 1:
            v = val_loss()
            log["curve"].append({"step": step, "train_lm_loss_ema": round(ema, 4), "val_loss": round(v, 4)})
            print(f"  val_loss {v:.4f}", flush=True)

    log["train_seconds"] = round(time.time() - t_train, 1)
    log["tokens_seen"] = args.steps * B * T
    log["final_train_lm_loss_ema"] = round(ema, 4)
    log["final_val_loss"] = log["curve"][-1]["val_loss"]
    model.config.output_router_logits = False
    model.generation_config.eos_token_id = eos_id
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps({k: v for k, v in log.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
