"""Every method in the MoEQuant main-table layout, on a bundled model: perplexity and wall time.

Table 1 (weight-only, W4 and W3, symmetric, group 128): FP, RTN, OmniQuant-LWC, AWQ, MoEQuant+, GPTQ,
QuaRot+GPTQ, MoEQuant++ with WikiText-2 and C4 perplexity (GPTQ-style windows, see
moeq.evaluate.perplexity) and the wall time of each method (calibration-set making, shown apart
because EBSS sets are generated once and cached, plus the quantization itself: rotation, searches,
solvers).
Table 2 (W4A4: 4-bit weights, 4-bit per-token activations, online Hadamard before every down
projection, fake quant): FP, QuaRot+GPTQ, MoEQuant++.

Each method runs with its registry defaults (moeq.methods: calibration source, AGQ/affinity weighting,
MSE clip, rotation; resolved inside the library exactly as for ``moeq quantize``) on a deep copy of one
loaded model. Results go to
benchmarks/results/methods_<model><suffix>.json (written after every cell) and a markdown rendering
to the .md beside it, which is also printed.

Full benchmark (the lead runs these; not run by the test suite):

    python benchmarks/methods_table.py --model qwen2-moe-tiny
    python benchmarks/methods_table.py --model mixtral-tiny

Smoke check of the script itself (tiny setting):

    python benchmarks/methods_table.py --model qwen2-moe-tiny --nsamples 8 --eval-limit 4 --suffix _smoke
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("MOEQ_QUIET", "1")

from moeq.config import AWQKnobs, BitPlan, CalibSpec, LWCKnobs, QuantConfig  # noqa: E402
from moeq.evaluate.perplexity import default_seqlen, evaluate_ppl  # noqa: E402
from moeq.models.loading import load_model  # noqa: E402
from moeq.pipeline import quantize_loaded  # noqa: E402
from moeq.quant.act import ActQuantArgs  # noqa: E402
from moeq.quant.primitives import QuantArgs  # noqa: E402

# (row label, moeq method), in the paper's row order
ROWS = [("RTN", "rtn"), ("OmniQuant (LWC)", "omniquant"), ("AWQ", "awq"), ("MoEQuant+", "moequant+"),
        ("GPTQ", "gptq"), ("QuaRot+GPTQ", "quarot-gptq"), ("MoEQuant++", "moequant++")]
W4A4_ROWS = [("QuaRot+GPTQ", "quarot-gptq"), ("MoEQuant++", "moequant++")]


def method_config(method: str, bits: int, args, act_bits: int | None = None) -> QuantConfig:
    """The method with its registry defaults (filled in by the library)."""
    return QuantConfig(
        method=method, plan=BitPlan(default=QuantArgs(bits, args.group_size, True)),
        calib=CalibSpec(None, args.nsamples, args.seqlen, args.seed),
        awq=AWQKnobs(), lwc=LWCKnobs(epochs=args.lwc_epochs), act=ActQuantArgs(act_bits) if act_bits else None)


def run_cell(loaded, windows, label, method, bits, args, act_bits=None) -> dict:
    cfg = method_config(method, bits, args, act_bits)
    t = time.perf_counter()
    q = quantize_loaded(loaded, cfg)
    wall = time.perf_counter() - t
    ppl = evaluate_ppl(q.model, loaded.tokenizer, ("wikitext2", "c4"), args.eval_seqlen, None, windows,
                       limit=args.eval_limit)
    return {"row": label, "method": method, "bits": bits, "act_bits": act_bits, "calib": cfg.calib.source,
            "wikitext2": ppl["wikitext2"]["ppl"], "c4": ppl["c4"]["ppl"], "seconds": round(wall, 2),
            "calib_seconds": round(q.seconds["calibration"], 2), "quant_seconds": round(q.seconds["quantize"], 2),
            "notes": q.method.notes}


def render(out: dict) -> str:
    fp = out["fp"]
    head = ["| method | bits | WikiText-2 PPL | C4 PPL | time (s) | of which calibration set (s) |",
            "|---|---|---|---|---|---|"]
    lines = [f"# Methods on {out['model']} ({out['setting']})", "", "## Weight-only (W-bits A16, g"
             f"{out['args']['group_size']})", ""] + head
    lines.append(f"| FP | 16 | {fp['wikitext2']:.3f} | {fp['c4']:.3f} | - | - |")
    for r in out["weight_only"]:
        lines.append(f"| {r['row']} | W{r['bits']} | {r['wikitext2']:.3f} | {r['c4']:.3f} | {r['seconds']:.1f} | "
                     f"{r['calib_seconds']:.1f} |")
    if out["w4a4"]:
        lines += ["", "## W4A4 (per-token activations, online Hadamard before every down projection; fake quant)",
                  ""] + head
        lines.append(f"| FP | 16 | {fp['wikitext2']:.3f} | {fp['c4']:.3f} | - | - |")
        for r in out["w4a4"]:
            lines.append(f"| {r['row']} | W{r['bits']}A{r['act_bits']} | {r['wikitext2']:.3f} | {r['c4']:.3f} | "
                         f"{r['seconds']:.1f} | {r['calib_seconds']:.1f} |")
    lines += ["", "Time = calibration-set making + quantization (rotation, searches, solvers) on this machine; EBSS "
              "sets are cached, so the first EBSS method in a run pays the generation and later ones reuse it."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2-moe-tiny")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=None, help="calibration window (default: min(2048, context))")
    ap.add_argument("--eval-seqlen", type=int, default=None)
    ap.add_argument("--eval-limit", type=int, default=None, help="first N evaluation windows per set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lwc-epochs", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=[m for _, m in ROWS], help="subset of rows to run")
    ap.add_argument("--skip-w4a4", action="store_true")
    ap.add_argument("--suffix", default="", help="added to the results file names")
    args = ap.parse_args()

    loaded = load_model(args.model)
    args.eval_seqlen = args.eval_seqlen or default_seqlen(loaded.model)
    windows: dict = {}
    t = time.perf_counter()
    fp = evaluate_ppl(loaded.model, loaded.tokenizer, ("wikitext2", "c4"), args.eval_seqlen, None, windows,
                      limit=args.eval_limit)
    setting = (f"{args.nsamples} calibration windows, eval {args.eval_limit or 'all'} windows x "
               f"{args.eval_seqlen} tokens")
    out = {"model": args.model, "setting": setting, "args": vars(args),
           "fp": {k: v["ppl"] for k, v in fp.items()}, "fp_eval_seconds": round(time.perf_counter() - t, 2),
           "weight_only": [], "w4a4": []}
    path = Path(__file__).parent / "results" / f"methods_{args.model}{args.suffix}.json"
    path.parent.mkdir(exist_ok=True)

    def save():
        path.write_text(json.dumps(out, indent=2) + "\n")
        path.with_suffix(".md").write_text(render(out))

    for bits in args.bits:
        for label, method in ROWS:
            if method in args.methods:
                r = run_cell(loaded, windows, label, method, bits, args)
                out["weight_only"].append(r)
                save()
                print(f"W{bits} {label:<16} wiki2 {r['wikitext2']:.3f} c4 {r['c4']:.3f} ({r['seconds']:.0f}s)", flush=True)
    if not args.skip_w4a4:
        for label, method in W4A4_ROWS:
            if method in args.methods:
                r = run_cell(loaded, windows, label, method, 4, args, act_bits=4)
                out["w4a4"].append(r)
                save()
                print(f"W4A4 {label:<16} wiki2 {r['wikitext2']:.3f} c4 {r['c4']:.3f} ({r['seconds']:.0f}s)", flush=True)
    save()
    print(render(out))


if __name__ == "__main__":
    main()
