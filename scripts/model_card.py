"""Measure a bundled model and write its MODEL_CARD.md (every figure in the card comes from here).

    python scripts/model_card.py src/moeq/bundled/qwen2-moe-tiny

Reads train_log.json (written by train_bundled_model.py) for the training figures, then measures
WikiText-2 test and C4 token perplexity and bits per byte with moeq's evaluator (the papers'
protocol at the model's context length) and expert usage per MoE layer on WikiText-2 test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MOEQ_QUIET", "1")

from moeq.evaluate.perplexity import default_seqlen, evaluate_ppl, wikitext2_windows  # noqa: E402
from moeq.evaluate.routing import expert_usage, usage_summary  # noqa: E402
from moeq.models.adapter import ModelAdapter  # noqa: E402
from moeq.models.loading import load_model  # noqa: E402


def _stages(log: dict) -> list[dict]:
    """The training stages, first to last, from a train_log.json and its nested ``init_log`` lineage."""
    out = []
    while log:
        out.append(log)
        log = log.get("init_log")
    return out[::-1]


def _first_revision(stages: list[dict]) -> bool:
    """Stage 1 trained by the script's first revision (its log has no per-layer balance coefficient)."""
    return "balance_coef" not in stages[0]


def _shared(cfg) -> str:
    if getattr(cfg, "shared_expert_intermediate_size", 0):
        return f"1, intermediate {cfg.shared_expert_intermediate_size}, sigmoid-gated"
    n = getattr(cfg, "n_shared_experts", 0) or 0
    return f"{n} (one MLP of intermediate {n * cfg.moe_intermediate_size}), ungated" if n else "none"


def _dense(cfg) -> str:
    k = getattr(cfg, "first_k_dense_replace", 0) or 0
    return f"the first {k} (MLP intermediate {cfg.intermediate_size})" if k else "none"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    args = ap.parse_args()
    d = Path(args.model_dir)
    log = json.loads((d / "train_log.json").read_text())
    loaded = load_model(str(d))
    m, tok = loaded.model, loaded.tokenizer
    ad = ModelAdapter.for_model(m)
    seqlen = default_seqlen(m)
    ppl = evaluate_ppl(m, tok, ("wikitext2", "c4"), seqlen)
    usage = usage_summary(expert_usage(m, wikitext2_windows(tok, seqlen).ids))
    cfg = m.config
    size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    lines = [
        f"# {d.name}",
        "",
        f"A small {type(m).__name__} ({cfg.model_type}) mixture-of-experts language model trained from scratch by "
        "moeq's `scripts/train_bundled_model.py` on `../shared/data/train_corpus` (Wikipedia, Project Gutenberg, "
        "Python code, Shakespeare, TinyStories; no WikiText-2 or C4 text). It exists so that moeq's quantization "
        "methods can be run and measured on a real, trained MoE model offline.",
        "",
        "## Architecture",
        "",
        f"| | |\n|---|---|\n| parameters | {log['params']:,} |\n| layers | {cfg.num_hidden_layers} |\n"
        f"| hidden size | {cfg.hidden_size} |\n| attention heads / kv heads | {cfg.num_attention_heads} / "
        f"{cfg.num_key_value_heads} |\n| routed experts / top-k | {ad.num_experts} / {ad.top_k} |\n"
        f"| expert intermediate size | {getattr(cfg, 'moe_intermediate_size', None) or cfg.intermediate_size} |\n"
        f"| shared expert | {_shared(cfg)} |\n| dense (non-MoE) blocks | {_dense(cfg)} |\n"
        f"| vocabulary | {cfg.vocab_size} (byte-level BPE trained on the same corpus) |\n"
        f"| context | {cfg.max_position_embeddings} |\n| weights on disk | {size / 2**20:.1f} MiB (bf16) |",
        "",
        "## Training",
        "",
        "Training ran in stages, each continuing from the previous checkpoint (`--init`); all on "
        "`../shared/data/train_corpus` with batch x sequence length as listed, AdamW (betas 0.9/0.95, weight "
        "decay 0.1), warmup then cosine decay to 10% of the peak lr, gradient clipping 1.0.",
        "",
        "| stage | steps | tokens | peak lr | load balancing | expert splits | time | final train loss (EMA) "
        "| held-out loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    stages = _stages(log)
    for n, st in enumerate(stages, 1):
        bal = (f"per-layer Switch loss, coef {st['balance_coef']}" if "balance_coef" in st
               else "transformers' router aux loss pooled over layers, coef 0.02")
        rev = ", ".join(f"L{r['layer']}: {r['donor']}->{r['dead']}" for r in st.get("revived", [])) or "-"
        lines.append(f"| {n} | {st['steps']} | {st['tokens_seen']:,} | {st['lr']} | {bal} | {rev} | "
                     f"{st['train_seconds'] / 60:.1f} min, {st['threads']} thread(s) | {st['final_train_lm_loss_ema']} "
                     f"| {st['final_val_loss']} |")
    total_tok = sum(st["tokens_seen"] for st in stages)
    total_min = sum(st["train_seconds"] for st in stages) / 60
    lines += [
        f"| total | {sum(st['steps'] for st in stages)} | {total_tok:,} | | | | {total_min:.1f} min | | |",
        "",
        "Held-out loss: 0.5% of the corpus documents, never trained on. Expert splits: before a stage, every "
        "expert below the `--revive` fraction of its uniform share on 8 training batches became a copy of the "
        "layer's busiest expert (router row plus a little noise), which the balance loss then pulls apart; a "
        "dead expert gets almost no gradient from the balance loss alone." + (
            " Stage 1 was trained by the first revision of the script (commit 886f0d3), whose pooled aux loss let "
            "single layers starve experts; the later stages fix that." if _first_revision(stages) else ""),
        "",
        f"## Evaluation (moeq eval, non-overlapping {seqlen}-token windows)",
        "",
        "| set | token perplexity | bits per byte | windows |\n|---|---|---|---|",
    ]
    for k, v in ppl.items():
        lines.append(f"| {k} | {v['ppl']:.2f} | {v['bpb']:.4f} | {v['windows']} x {v['seqlen']} |")
    lines += ["", "## Expert usage on WikiText-2 test", "",
              f"Expert-balance std (MoEQuant Eq. 4, lower is more balanced): {usage['balance_std']:.4f}. "
              "Share of each expert relative to the uniform share 1/E (1.0 = uniform):", "",
              "| layer | min share | max share | tokens per expert |", "|---|---|---|---|"]
    for i, r in usage["layers"].items():
        lines.append(f"| {i} | {r['min_rel_share']:.2f} | {r['max_rel_share']:.2f} | {' '.join(map(str, r['counts']))} |")
    starved = [i for i, r in usage["layers"].items() if r["min_rel_share"] < 0.2]
    lines += ["", "No expert is starved (every expert gets at least 20% of its uniform share)." if not starved
              else f"Layers with an expert below 20% of its uniform share: {starved}.", "",
              ("Reproduce: stage 1 with commit 886f0d3's script, then for each later stage " if _first_revision(stages)
               else "Reproduce: for each stage ") +
              "`python scripts/train_bundled_model.py --arch ARCH [--init PREV] --tokenizer PREV --steps S --lr LR "
              "--warmup W --balance-coef C [--revive R] --threads 1 --bf16 --out NEXT` with the stage's figures "
              "from `train_log.json` (`init_log` holds the earlier stages; the first stage starts from random "
              "weights with the bundled tokenizer), then `python scripts/model_card.py DIR`.",
              ""]
    (d / "MODEL_CARD.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if not starved else 1


if __name__ == "__main__":
    sys.exit(main())
