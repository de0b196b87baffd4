"""moeq GPTQ vs llm-compressor's GPTQModifier on a bundled model: same calibration token ids, same scheme.

Runs both in one process sequence on the same machine and prints WikiText-2 / C4 perplexity of each
and the wall-time ratio moeq / llm-compressor (calibration + quantization only; loading and evaluation
are excluded for both). llm-compressor is run with its defaults apart from the scheme: its static
act-order, all-experts calibration, dampening 0.01 and one statistics pass per decoder layer (its
sequential pipeline calibrates every linear of a layer on the layer's unquantized inputs) are matched
in the moeq "matched" row (``--act-order --expert-coverage all --no-true-sequential``); a "fast" row
uses moeq's routed-expert statistics with one pass per block, and the "defaults" row is moeq's
default (routed experts, true-sequential groups q,k,v -> o -> gate/up -> down, no act-order).

llm-compressor 0.14 pins transformers 5.17 and compressed-tensors 0.19, so run this from an
environment that has it (moeq supports that version range):

    python -m venv .venv-peer && . .venv-peer/bin/activate
    pip install torch==2.13.0 && pip install llmcompressor==0.14.0.1 -e .
    python benchmarks/peer_llmcompressor.py --model qwen2-moe-tiny --bits 4 3

Results are also written to benchmarks/results/peer_llmcompressor_<model>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("MOEQ_QUIET", "1")

from moeq.calib.windows import calibration_windows  # noqa: E402
from moeq.config import BitPlan, CalibSpec, GPTQKnobs, QuantConfig  # noqa: E402
from moeq.evaluate.perplexity import evaluate_ppl  # noqa: E402
from moeq.models.adapter import ModelAdapter  # noqa: E402
from moeq.models.loading import load_model  # noqa: E402
from moeq.pipeline import quantize_loaded  # noqa: E402
from moeq.quant.primitives import QuantArgs  # noqa: E402


def run_llmcompressor(model, tok, ids: torch.Tensor, bits: int, group: int, ignore: list[str]) -> float:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    scheme = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}}}
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=GPTQModifier(config_groups=scheme, ignore=ignore,
            dampening_frac=0.01), num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False)
    return time.perf_counter() - t


def run_moeq(base, calib_jsonl: Path, n: int, seqlen: int, bits: int, group: int, act_order: bool, coverage: str,
             true_seq: bool):
    """(quantized copy of ``base.model``, calibration + quantization seconds) on the shared calibration ids."""
    cfg = QuantConfig(method="gptq", plan=BitPlan(default=QuantArgs(bits, group, True)),
                      calib=CalibSpec(str(calib_jsonl), n, seqlen),
                      gptq=GPTQKnobs(damp=0.01, act_order=act_order), expert_coverage=coverage,
                      true_sequential=true_seq)
    q = quantize_loaded(base, cfg)
    return q.model, q.seconds["calibration"] + q.seconds["quantize"]


# (label, act-order, expert coverage, true-sequential)
MOEQ_ROWS = (
    ("moeq gptq matched (--act-order --expert-coverage all --no-true-sequential)", True, "all", False),
    ("moeq gptq fast (routed experts, --no-true-sequential)", False, "routed", False),
    ("moeq gptq defaults (routed experts, true-sequential)", False, "routed", True),
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2-moe-tiny")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-limit", type=int, default=None, help="perplexity windows per set (default: all)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--suffix", default="", help="added to the results file name")
    args = ap.parse_args()

    base = load_model(args.model)
    ad = ModelAdapter.for_model(base.model)
    ignore = ["lm_head"] + [f"re:.*{p.rpartition('.')[2]}$" for p in
                            {ad.spec.moe.router, ad.spec.moe.shared_gate} if p] if ad.spec.moe else ["lm_head"]
    ids = calibration_windows(base.tokenizer, "wikitext2", args.nsamples, args.seqlen, seed=0).ids  # (n, T)
    tmp = tempfile.TemporaryDirectory(prefix="peer_llmc_")
    calib_jsonl = Path(tmp.name) / "calib.jsonl"  # the same ids for moeq, as a token-id calibration file
    calib_jsonl.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ids.tolist()))
    windows: dict = {}
    ppl = lambda m: evaluate_ppl(m, base.tokenizer, ("wikitext2", "c4"), None, None, windows, limit=args.eval_limit)
    rows = [{"method": "FP", "bits": 16, **{k: v["ppl"] for k, v in ppl(base.model).items()}, "seconds": None}]
    for bits in args.bits:
        peer_t = None
        if not args.skip_peer:
            m = copy.deepcopy(base.model)
            peer_t = run_llmcompressor(m, base.tokenizer, ids, bits, args.group_size, ignore)
            rows.append({"method": "llm-compressor GPTQModifier (defaults: static act-order, all experts)",
                         "bits": bits, **{k: v["ppl"] for k, v in ppl(m).items()}, "seconds": peer_t})
            del m
        for label, act, cov, ts in MOEQ_ROWS:
            m, t = run_moeq(base, calib_jsonl, args.nsamples, args.seqlen, bits, args.group_size, act, cov, ts)
            rows.append({"method": label, "bits": bits, **{k: v["ppl"] for k, v in ppl(m).items()}, "seconds": t,
                         "time_ratio_vs_peer": (t / peer_t) if peer_t else None})
            del m
    print(f"\nmodel {args.model}, calibration {args.nsamples} x {args.seqlen} WikiText-2 tokens, g{args.group_size} sym")
    print(f"{'method':<70} {'bits':>4} {'wiki2 ppl':>10} {'c4 ppl':>9} {'seconds':>8} {'ratio':>6}")
    for r in rows:
        s = f"{r['seconds']:8.1f}" if r["seconds"] else f"{'':>8}"
        ratio = f"{r['time_ratio_vs_peer']:6.2f}" if r.get("time_ratio_vs_peer") else ""
        print(f"{r['method']:<70} {r['bits']:>4} {r['wikitext2']:>10.3f} {r['c4']:>9.3f} {s} {ratio}")
    out = Path(__file__).parent / "results" / f"peer_llmcompressor_{args.model}{args.suffix}.json"
    out.parent.mkdir(exist_ok=True)
    import transformers
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads()}
    try:
        import compressed_tensors
        import llmcompressor
        env.update(llmcompressor=llmcompressor.__version__, compressed_tensors=compressed_tensors.__version__)
    except ImportError:
        pass
    out.write_text(json.dumps({"args": vars(args), "env": env, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
