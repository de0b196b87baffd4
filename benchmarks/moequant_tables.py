"""MoEQuant evidence on the bundled models: the calibration-set table and the EBSS/AGQ ablation.

Table 1 (like the paper's calibration-set table): for calibration from WikiText-2, C4, GSM8K,
HumanEval and EBSS, the set's expert-balance std (MoEQuant Eq. 4) and the W{--calib-bits} g128 GPTQ
perplexity it leads to.
Table 2 (ablation): at W4 and W3 g128: GPTQ, +AGQ, +EBSS, +both (MoEQuant) with WikiText-2 and C4
perplexity and their gap to FP, over several seeds (calibration sampling / EBSS seed): mean and std.

Everything runs in-process on one loaded model (deep copies per cell); EBSS sets are cached by the
normal moeq cache, so a rerun reuses them. Results go to benchmarks/results/moequant_<model>[_<tag>].json
and a markdown rendering is printed.

    python benchmarks/moequant_tables.py --model qwen2-moe-tiny --seeds 0 1 2
    # steered EBSS for small models (see README):
    python benchmarks/moequant_tables.py --model qwen2-moe-tiny --seeds 0 --width 16 --tau 0.05 \
        --no-repeat-ngram 3 --tag steered
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("MOEQ_QUIET", "1")

from moeq.config import BitPlan, CalibSpec, QuantConfig  # noqa: E402
from moeq.evaluate.perplexity import default_seqlen, evaluate_ppl  # noqa: E402
from moeq.evaluate.routing import balance_std, expert_usage  # noqa: E402
from moeq.models.loading import load_model  # noqa: E402
from moeq.pipeline import make_calibration, quantize_loaded  # noqa: E402
from moeq.quant.primitives import QuantArgs  # noqa: E402


def cell(loaded, windows, bits, source, agq, seed, nsamples, seqlen, limit, width, tau, ngram):
    cfg = QuantConfig(method="moequant" if (agq and source == "ebss") else "gptq",
                      plan=BitPlan(default=QuantArgs(bits, 128, True)),
                      calib=CalibSpec(source, nsamples, seqlen, seed, width, tau, ngram), agq=agq)
    t = time.perf_counter()
    q = quantize_loaded(loaded, cfg)
    secs = time.perf_counter() - t
    ppl = evaluate_ppl(q.model, loaded.tokenizer, ("wikitext2", "c4"), seqlen, None, windows, limit=limit)
    return {"bits": bits, "calib": source, "agq": agq, "seed": seed, "seconds": secs,
            "calib_seconds": q.seconds["calibration"],
            "wikitext2": ppl["wikitext2"]["ppl"], "c4": ppl["c4"]["ppl"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2-moe-tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--calib-bits", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--tau", type=float, default=1.2)
    ap.add_argument("--no-repeat-ngram", type=int, default=0, help="EBSS beams never repeat an n-gram (0 = off)")
    ap.add_argument("--tag", default="", help="suffix for the result file (e.g. steered)")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--skip", choices=["calib", "ablation"], default=None)
    ap.add_argument("--render-only", action="store_true", help="print the markdown of the saved JSON")
    ap.add_argument("--wikitext-seeds", type=int, nargs="*", default=[],
                    help="extra calibration seeds for the WikiText-2-calibrated rows only (seed noise, cheap)")
    ap.add_argument("--resume", action="store_true", help="keep finished cells of the saved JSON, add missing ones")
    args = ap.parse_args()

    path = Path(__file__).parent / "results" / f"moequant_{args.model}{'_' + args.tag if args.tag else ''}.json"
    if args.render_only:
        print(render(json.loads(path.read_text())))
        return
    loaded = load_model(args.model)
    seqlen = default_seqlen(loaded.model)
    windows: dict = {}
    fp = evaluate_ppl(loaded.model, loaded.tokenizer, ("wikitext2", "c4"), seqlen, None, windows,
                      limit=args.eval_limit)
    fp = {k: v["ppl"] for k, v in fp.items()}
    out = {"model": args.model, "args": vars(args), "seqlen": seqlen, "fp": fp, "calibration_sets": [],
           "ablation": []}
    if args.resume and path.exists():  # keep finished cells (same settings), add the missing ones
        old = json.loads(path.read_text())
        keep = ("nsamples", "width", "tau", "no_repeat_ngram", "calib_bits", "eval_limit")
        if any(old["args"].get(k) != out["args"].get(k) for k in keep):
            raise SystemExit(f"{path} was made with other settings; drop --resume or use another --tag")
        out["calibration_sets"], out["ablation"] = old["calibration_sets"], old["ablation"]
        out["args"]["seeds"] = sorted(set(old["args"]["seeds"]) | set(args.seeds))
        out["args"]["wikitext_seeds"] = sorted(set(old["args"].get("wikitext_seeds", [])) | set(args.wikitext_seeds))
    done_calib = {r["calib"] for r in out["calibration_sets"]}
    done = {(r["bits"], r["variant"], r["seed"]) for r in out["ablation"]}
    path.parent.mkdir(exist_ok=True)
    save = lambda: path.write_text(json.dumps(out, indent=2) + "\n")

    if args.skip != "calib":
        for source in [s for s in ("wikitext2", "c4", "gsm8k", "humaneval", "ebss") if s not in done_calib]:
            cfg = QuantConfig(method="gptq", calib=CalibSpec(source, args.nsamples, seqlen, 0, args.width, args.tau,
                                                              args.no_repeat_ngram))
            t = time.perf_counter()
            cs = make_calibration(loaded.model, loaded.tokenizer, loaded.path, cfg)
            gen_s = time.perf_counter() - t
            std = balance_std(expert_usage(loaded.model, cs.ids))
            r = cell(loaded, windows, args.calib_bits, source, False, 0, args.nsamples, seqlen, args.eval_limit,
                     args.width, args.tau, args.no_repeat_ngram)
            r.update(calib_balance_std=std, calib_make_seconds=gen_s)
            out["calibration_sets"].append(r)
            save()
            print(f"calib {source:<10} std {std:.4f}  W{args.calib_bits} wiki2 {r['wikitext2']:.3f} c4 {r['c4']:.3f}",
                  flush=True)

    if args.skip != "ablation":
        for bits in args.bits:
            for label, source, agq in (("GPTQ", "wikitext2", False), ("+AGQ", "wikitext2", True),
                                       ("+EBSS", "ebss", False), ("MoEQuant (EBSS+AGQ)", "ebss", True)):
                seeds = args.seeds + (args.wikitext_seeds if source == "wikitext2" else [])
                for seed in [s for s in dict.fromkeys(seeds) if (bits, label, s) not in done]:
                    r = cell(loaded, windows, bits, source, agq, seed, args.nsamples, seqlen, args.eval_limit,
                             args.width, args.tau, args.no_repeat_ngram)
                    r["variant"] = label
                    out["ablation"].append(r)
                    save()
                    print(f"W{bits} {label:<22} seed {seed}: wiki2 {r['wikitext2']:.3f} c4 {r['c4']:.3f} "
                          f"({r['seconds']:.0f}s)", flush=True)

    print(render(out))


def render(out: dict) -> str:
    fp = out["fp"]
    a = out["args"]
    lines = [f"FP: WikiText-2 {fp['wikitext2']:.3f}, C4 {fp['c4']:.3f}; {a['nsamples']} calibration sequences; "
             f"EBSS width {a['width']}, tau {a['tau']}, no-repeat-ngram {a.get('no_repeat_ngram', 0)}", ""]
    if out["calibration_sets"]:
        b = out["args"]["calib_bits"]
        lines += [f"| calibration set | expert-balance std | W{b} g128 WikiText-2 PPL | W{b} g128 C4 PPL "
                  "| set built in | tokens/s |", "|---|---|---|---|---|---|"]
        ntok = a["nsamples"] * out.get("seqlen", 0)  # tokens of the set
        for r in out["calibration_sets"]:
            secs = r["calib_make_seconds"]
            tps = "(read from disk)" if r["calib"] != "ebss" or not ntok else \
                "(EBSS set reused from the cache)" if secs < 5 else f"{ntok / secs:.0f}"
            lines.append(f"| {r['calib']} | {r['calib_balance_std']:.4f} | {r['wikitext2']:.3f} | {r['c4']:.3f} "
                         f"| {secs:.1f} s | {tps} |")
        lines.append("")
    if out["ablation"]:
        lines += ["| bits | method | WikiText-2 PPL | gap to FP | C4 PPL | gap to FP | seeds |",
                  "|---|---|---|---|---|---|---|"]
        keys = []
        for r in out["ablation"]:
            k = (r["bits"], r["variant"])
            if k not in keys:
                keys.append(k)
        for bits, var in keys:
            rows = [r for r in out["ablation"] if r["bits"] == bits and r["variant"] == var]
            fmt = []
            for ds in ("wikitext2", "c4"):
                v = [r[ds] for r in rows]
                m = statistics.mean(v)
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                fmt += [f"{m:.3f} ± {sd:.3f}", f"{m - fp[ds]:+.3f}"]
            lines.append(f"| W{bits} | {var} | {fmt[0]} | {fmt[1]} | {fmt[2]} | {fmt[3]} | {len(rows)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
