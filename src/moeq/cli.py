"""``moeq`` command line: quantize, eval, models. The only module that reads argv.

Every subcommand turns its flags into typed configs and calls the library; errors the user can fix
(bad bits, missing data, unreadable checkpoint, existing output) are printed as one line naming the
problem and the fix, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import COVERAGE, FALLBACKS, METHODS, BitPlan, CalibSpec, GPTQKnobs, QuantConfig
from .quant.primitives import QuantArgs


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N]")
    p.add_argument("--data-dir", default=None, help="data folder (default: $MOEQ_DATA_DIR, then ../shared/data)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow remote-code model classes")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moeq", description="MoE-aware post-training quantization.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model, export compressed-tensors, report perplexity")
    q.add_argument("model", nargs="?", default=None, help="bundled name, checkpoint dir or hub id (default: bundled)")
    q.add_argument("--out", required=True, help="output folder (checkpoint + report.json)")
    q.add_argument("--method", choices=METHODS, default="gptq")
    q.add_argument("--bits", type=int, default=4, help="weight bits, 2..8 (default 4)")
    q.add_argument("--group-size", type=int, default=128, help="-1 = per channel, or e.g. 32/64/128 (default 128)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with zero points")
    q.add_argument("--calib", default="wikitext2", help="wikitext2, c4, gsm8k, humaneval, or a .txt/.jsonl path")
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=int, default=None, help="calibration window length (default: min(2048, context))")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--act-order", action="store_true", help="GPTQ act-order (static groups)")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ relative damping (default 0.01)")
    q.add_argument("--blocksize", type=int, default=128, help="GPTQ lazy-update block size")
    q.add_argument("--mse-clip", action="store_true", help="MSE clip search for scales (RTN and GPTQ)")
    q.add_argument("--expert-coverage", choices=COVERAGE, default="routed",
                   help="routed: expert statistics from routed tokens only; all: every token through every "
                        "expert for statistics (outputs still combine routed experts only)")
    q.add_argument("--min-tokens", type=int, default=8, help="experts with fewer routed tokens use --fallback")
    q.add_argument("--fallback", choices=FALLBACKS, default="rtn")
    q.add_argument("--batch-size", type=int, default=8, help="calibration sequences per block forward")
    q.add_argument("--ppl", type=_csv, default=("wikitext2",), help="perplexity sets, e.g. wikitext2,c4")
    q.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window (default: min(2048, context))")
    q.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N windows (quick checks)")
    q.add_argument("--skip-eval", action="store_true", help="skip the perplexity evaluation")
    q.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    _add_common(q)

    e = sub.add_parser("eval", help="perplexity (and bits per byte) of a model or quantized checkpoint")
    e.add_argument("model", help="bundled name, checkpoint dir (quantized or not) or hub id")
    e.add_argument("--ppl", type=_csv, default=("wikitext2",), help="wikitext2,c4")
    e.add_argument("--seqlen", type=int, default=None, help="window length (default: min(2048, context))")
    e.add_argument("--limit", type=int, default=None, help="only the first N windows of each set (quick checks)")
    e.add_argument("--json", default=None, help="write the results to this file")
    _add_common(e)

    m = sub.add_parser("models", help="list the bundled models")
    m.add_argument("--json", action="store_true")
    return ap


def cmd_quantize(a) -> int:
    from .evaluate.report import format_table, module_table
    from .pipeline import quantize

    cfg = QuantConfig(
        method=a.method,
        plan=BitPlan(default=QuantArgs(a.bits, a.group_size, a.sym)),
        calib=CalibSpec(a.calib, a.nsamples, a.seqlen, a.seed),
        gptq=GPTQKnobs(a.blocksize, a.damp, a.act_order, a.mse_clip),
        expert_coverage=a.expert_coverage, min_tokens=a.min_tokens, fallback=a.fallback,
        mse_clip=a.mse_clip, batch_size=a.batch_size)
    rep = quantize(a.model, cfg, a.out, device=a.device, ppl=a.ppl, eval_seqlen=a.eval_seqlen,
                   skip_eval=a.skip_eval, eval_limit=a.eval_limit, overwrite=a.overwrite, data_dir=a.data_dir,
                   trust_remote_code=a.trust_remote_code)
    if a.verbose:
        print(module_table(rep["modules"]))
    print(f"model {rep['model']['name']} ({rep['model']['architecture']}, {rep['model']['params']:,} params)")
    print(format_table(rep))
    if rep["fallbacks"]:
        print(f"{len(rep['fallbacks'])} linears used the {cfg.fallback} fallback (too few routed tokens); "
              "see report.json 'fallbacks'")
    if "size" in rep:
        s = rep["size"]
        print(f"checkpoint {s['checkpoint_bytes'] / 2**20:.1f} MiB (bf16: {s['bf16_bytes'] / 2**20:.1f} MiB) -> {a.out}")
    return 0


def cmd_eval(a) -> int:
    from .evaluate.perplexity import evaluate_ppl
    from .models.loading import load_model
    from .utils.device import fits_on_device, resolve_device
    from .utils.fs import write_atomic

    device = resolve_device(a.device)
    loaded = load_model(a.model, device=device, trust_remote_code=a.trust_remote_code)
    if fits_on_device(loaded.model, device):
        loaded.model.to(device)
    res = evaluate_ppl(loaded.model, loaded.tokenizer, a.ppl, a.seqlen, a.data_dir, limit=a.limit)
    for name, r in res.items():
        print(f"{name:<10} ppl {r['ppl']:.3f}  bpb {r['bpb']:.4f}  ({r['windows']} windows x {r['seqlen']} tokens)")
    if a.json:
        write_atomic(a.json, json.dumps(res, indent=2) + "\n")
    return 0


def cmd_models(a) -> int:
    from .models.bundled import bundled_names, describe

    rows = [describe(n) for n in bundled_names()]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        star = " (default)" if r["default"] else ""
        print(f"{r['name']}{star}: {r['architecture']} ({r['model_type']}), {r['parameters']:,} parameters\n"
              f"    {r['path']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .calib.sources import DataNotFoundError
    from .models.loading import CheckpointError
    from .models.registry import UnsupportedArchitectureError
    from .utils.fs import OutputExistsError
    from .utils.progress import setup_logging

    ap = build_parser()
    a = ap.parse_args(argv)
    setup_logging(getattr(a, "verbose", False))
    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "models": cmd_models}[a.cmd](a)
    except (ValueError, DataNotFoundError, CheckpointError, UnsupportedArchitectureError, OutputExistsError) as e:
        print(f"moeq {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
