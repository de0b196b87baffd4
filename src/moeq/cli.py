"""``moeq`` command line: quantize, eval, models. The only module that reads argv.

Every subcommand turns its flags into typed configs and calls the library; errors the user can fix
(bad bits, missing data, unreadable checkpoint, existing output) are printed as one line naming the
problem and the fix, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import COVERAGE, FALLBACKS, METHODS, AWQKnobs, BitPlan, CalibSpec, GPTQKnobs, LWCKnobs, QuantConfig
from .quant.act import ActQuantArgs
from .quant.primitives import QuantArgs


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N]")
    p.add_argument("--data-dir", default=None, help="data folder (default: $MOEQ_DATA_DIR, then ../shared/data)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow remote-code model classes")
    p.add_argument("-v", "--verbose", action="store_true")


def _fewshot(s: str) -> dict[str, int]:
    """"mmlu=5,gsm8k=8" -> {"mmlu": 5, "gsm8k": 8}."""
    out = {}
    for part in _csv(s):
        name, _, n = part.partition("=")
        if not n.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"--num-fewshot expects task=N pairs, e.g. mmlu=5,gsm8k=8; got {part!r}")
        out[name.strip()] = int(n)
    return out


def _add_task_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=_csv, default=(),
                   help="downstream tasks through lm-evaluation-harness, offline: hellaswag,piqa,boolq,copa,"
                        "openbookqa,winogrande,arc_easy,arc_challenge,mmlu,mathqa,gsm8k,humaneval,lambada")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task (each MMLU subject)")
    p.add_argument("--num-fewshot", type=_fewshot, default=None, help="per-task shots, e.g. mmlu=5,gsm8k=8")
    p.add_argument("--task-batch-size", type=int, default=8)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moeq", description="MoE-aware post-training quantization.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model, export compressed-tensors, report perplexity")
    q.add_argument("model", nargs="?", default=None, help="bundled name, checkpoint dir or hub id (default: bundled)")
    q.add_argument("--out", required=True, help="output folder (checkpoint + report.json)")
    q.add_argument("--method", choices=METHODS, default="gptq")
    q.add_argument("--bits", type=int, default=4, help="weight bits, 2..8 (default 4)")
    q.add_argument("--group-size", type=int, default=128, help="-1 = per channel, or e.g. 32/64/128 (default 128)")
    q.add_argument("--plan", default=None,
                   help="bit plan file (.yaml/.json from `moeq plan`): per-module widths; replaces --bits/--group-size")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with zero points")
    q.add_argument("--calib", default=None,
                   help="wikitext2 (default), c4, gsm8k, humaneval, ebss (self-generated, cached), a .txt/.jsonl "
                        "text file or a .jsonl of input_ids rows (moeq calib ebss); moequant defaults to ebss")
    q.add_argument("--ebss-width", type=int, default=4, help="EBSS beam width (default 4)")
    q.add_argument("--ebss-tau", type=float, default=1.2, help="EBSS balance temperature (default 1.2)")
    q.add_argument("--ebss-no-repeat-ngram", type=int, default=0,
                   help="EBSS beams never repeat one of their n-grams (e.g. 3; default 0 = off, as in the paper)")
    q.add_argument("--agq", action=argparse.BooleanOptionalAction, default=None,
                   help="affinity-guided Hessians for routed and shared experts (default: on for moequant)")
    q.add_argument("--agq-gate-proj", action=argparse.BooleanOptionalAction, default=True,
                   help="also weight the experts' gate_proj (MoEQuant Eq. 17; default on)")
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=int, default=None, help="calibration window length (default: min(2048, context))")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--act-order", action="store_true", help="GPTQ act-order (static groups)")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ relative damping (default 0.01)")
    q.add_argument("--blocksize", type=int, default=128, help="GPTQ lazy-update block size")
    q.add_argument("--mse-clip", action=argparse.BooleanOptionalAction, default=None,
                   help="MSE clip search for scales, RTN and GPTQ (default: on for moequant, quarot-gptq, moequant++)")
    q.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="QuaRot: fuse norms, rotate the residual stream by a random Hadamard before quantizing "
                        "(default: on for quarot-gptq and moequant++)")
    q.add_argument("--rotation-seed", type=int, default=0, help="seed of the random Hadamard signs")
    q.add_argument("--act-bits", type=int, default=None,
                   help="also fake-quantize every quantized linear's input per token (W*A*, e.g. 4); evaluation only "
                        "unless --no-online-hadamard")
    q.add_argument("--act-clip", type=float, default=1.0, help="per-token activation range ratio (QuaRot: 0.9)")
    q.add_argument("--online-hadamard", action=argparse.BooleanOptionalAction, default=True,
                   help="with --act-bits: online Hadamard before every down projection (default on)")
    q.add_argument("--awq-grid", type=int, default=20, help="AWQ scale-exponent grid points (default 20)")
    q.add_argument("--awq-clip", action=argparse.BooleanOptionalAction, default=True,
                   help="AWQ output-aware clip search after the scales (default on)")
    q.add_argument("--lwc-epochs", type=int, default=2, help="omniquant: LWC epochs per block (default 2; paper 20)")
    q.add_argument("--lwc-lr", type=float, default=5e-2, help="omniquant: LWC learning rate (default 5e-2)")
    q.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="solve a block's linears group by group (q,k,v -> o -> gate/up -> down), each group's "
                        "statistics taken after the previous groups are quantized (default); --no-true-sequential: "
                        "one statistics pass per block for all its linears, about half the forwards")
    q.add_argument("--expert-coverage", choices=COVERAGE, default="routed",
                   help="routed: expert statistics from routed tokens only; all: every token through every "
                        "expert for statistics (outputs still combine routed experts only)")
    q.add_argument("--min-tokens", type=int, default=8, help="experts with fewer routed tokens use --fallback")
    q.add_argument("--fallback", choices=FALLBACKS, default="rtn")
    q.add_argument("--batch-size", type=int, default=8, help="calibration sequences per block forward")
    q.add_argument("--ppl", type=_csv, default=("wikitext2",), help="perplexity sets, e.g. wikitext2,c4")
    q.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window (default: min(2048, context))")
    q.add_argument("--ppl-limit", type=int, default=None, help="evaluate only the first N windows (quick checks)")
    _add_task_flags(q)
    q.add_argument("--fidelity", action="store_true",
                   help="also measure routing fidelity and KL(FP||quantized) on WikiText-2 (keeps an FP copy)")
    q.add_argument("--skip-eval", action="store_true", help="skip the perplexity and task evaluation")
    q.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    _add_common(q)

    e = sub.add_parser("eval", help="perplexity (and bits per byte) of a model or quantized checkpoint")
    e.add_argument("model", help="bundled name, checkpoint dir (quantized or not) or hub id")
    e.add_argument("--ppl", type=_csv, default=("wikitext2",), help="wikitext2,c4 (or none)")
    e.add_argument("--seqlen", type=int, default=None, help="window length (default: min(2048, context))")
    e.add_argument("--ppl-limit", type=int, default=None, help="only the first N windows of each set (quick checks)")
    _add_task_flags(e)
    e.add_argument("--balance", action="store_true",
                   help="expert-balance std and per-layer expert usage on the WikiText-2 test windows")
    e.add_argument("--against", default=None, metavar="FP_MODEL",
                   help="routing fidelity and KL(FP||this) against this full-precision model")
    e.add_argument("--json", default=None, help="write the results to this file")
    _add_common(e)

    c = sub.add_parser("calib", help="calibration sets: generate EBSS, measure expert balance")
    csub = c.add_subparsers(dest="calib_cmd", required=True)
    ce = csub.add_parser("ebss", help="the model writes its own expert-balanced calibration set (MoEQuant EBSS)")
    ce.add_argument("model", nargs="?", default=None)
    ce.add_argument("--num", type=int, default=128, help="sequences (default 128)")
    ce.add_argument("--length", type=int, default=512, help="tokens per sequence (default 512)")
    ce.add_argument("--width", type=int, default=4, help="beam width (default 4)")
    ce.add_argument("--tau", type=float, default=1.2, help="balance temperature (default 1.2)")
    ce.add_argument("--seed", type=int, default=0)
    ce.add_argument("--batch", type=int, default=32, help="sequences generated together (x width rows)")
    ce.add_argument("--no-repeat-ngram", type=int, default=0,
                    help="a beam never repeats one of its n-grams (e.g. 3; default 0 = off, as in the paper)")
    ce.add_argument("--out", required=True, help="output .jsonl (input_ids, text, nll, balance_std per line)")
    ce.add_argument("--overwrite", action="store_true")
    _add_common(ce)
    cs = csub.add_parser("stats", help="expert-balance std and per-layer expert usage of a calibration set")
    cs.add_argument("model", nargs="?", default=None)
    cs.add_argument("--calib", required=True, help="wikitext2, c4, gsm8k, humaneval, or a .txt/.jsonl path")
    cs.add_argument("--nsamples", type=int, default=128)
    cs.add_argument("--seqlen", type=int, default=None,
                    help="window length (default: a token-id .jsonl's own row length, else min(2048, context))")
    cs.add_argument("--seed", type=int, default=0)
    cs.add_argument("--json", default=None, help="write balance_std and per-layer counts here")
    _add_common(cs)

    b = sub.add_parser("bench", help="grid of methods x bits x calibration sets, cached per cell, paper tables")
    b.add_argument("model", nargs="?", default=None)
    b.add_argument("--out", required=True, help="bench folder (reused: finished cells are skipped)")
    b.add_argument("--grid", default=None, help="YAML grid file (keys as the flags below); overrides them")
    b.add_argument("--methods", type=_csv, default=("rtn", "gptq", "moequant"),
                   help="any `quantize --method`, or gptq-agq (default rtn,gptq,moequant)")
    b.add_argument("--bits", type=_csv, default=("4", "3"))
    b.add_argument("--group-size", type=int, default=128)
    b.add_argument("--calib", type=_csv, default=("wikitext2",), help="calibration sets for GPTQ-family methods")
    b.add_argument("--nsamples", type=int, default=128)
    b.add_argument("--seqlen", type=int, default=None)
    b.add_argument("--ppl", type=_csv, default=("wikitext2", "c4"))
    b.add_argument("--ppl-limit", type=int, default=None)
    b.add_argument("--tasks", type=_csv, default=())
    b.add_argument("--limit", type=int, default=None, help="first N examples per task")
    _add_common(b)

    from .allocate.commands import add_parsers as add_allocate_parsers

    add_allocate_parsers(sub, _add_common)  # moeq profile, moeq plan

    m = sub.add_parser("models", help="list the bundled models")
    m.add_argument("--json", action="store_true")
    return ap


def resolve_method_defaults(a, dense: bool = False) -> None:
    """Method presets (``moeq.methods.PRESETS``), e.g. moequant = EBSS calibration + AGQ (with gate_proj) +
    MSE-clipped GPTQ, moequant++ = that plus rotation; explicit flags always win. A dense model has no
    experts to balance: its EBSS preset falls back to wikitext2 (an explicit --calib ebss still fails)."""
    from .methods import PRESETS

    preset = PRESETS[a.method]
    for key in ("calib", "agq", "mse_clip", "rotate"):
        if getattr(a, key, None) is None:
            setattr(a, key, preset[key])
            if key == "calib" and dense and preset[key] == "ebss":
                a.calib = "wikitext2"
                print(f"moeq quantize: {a.method}: the model has no MoE layers, so EBSS does not apply; "
                      "calibrating on wikitext2", file=sys.stderr)


def _is_dense(model: str | None, trust_remote_code: bool) -> bool:
    """True when the registry spec of ``model`` has no MoE part (unreadable models: False, they fail later)."""
    from .models.loading import load_config, resolve_model
    from .models.registry import get_spec

    try:
        return get_spec(load_config(resolve_model(model), trust_remote_code).model_type).moe is None
    except Exception:
        return False


def cmd_quantize(a) -> int:
    from .evaluate.report import format_table, module_table
    from .pipeline import EvalSpec, quantize

    resolve_method_defaults(a, dense=_is_dense(a.model, a.trust_remote_code))
    cfg = QuantConfig(
        method=a.method,
        plan=_load_plan(a.plan) if a.plan else BitPlan(default=QuantArgs(a.bits, a.group_size, a.sym)),
        calib=CalibSpec(a.calib, a.nsamples, a.seqlen, a.seed, a.ebss_width, a.ebss_tau, a.ebss_no_repeat_ngram),
        gptq=GPTQKnobs(a.blocksize, a.damp, a.act_order, a.mse_clip),
        expert_coverage=a.expert_coverage, true_sequential=a.true_sequential, min_tokens=a.min_tokens,
        fallback=a.fallback,
        mse_clip=a.mse_clip, batch_size=a.batch_size, agq=a.agq, agq_gate_proj=a.agq_gate_proj,
        awq=AWQKnobs(grid=a.awq_grid, clip=a.awq_clip), lwc=LWCKnobs(epochs=a.lwc_epochs, lr=a.lwc_lr),
        rotate=a.rotate, rotate_seed=a.rotation_seed, online_hadamard=a.online_hadamard,
        act=ActQuantArgs(a.act_bits, a.act_clip) if a.act_bits else None)
    evals = EvalSpec(ppl=_ppl_sets(a.ppl), seqlen=a.eval_seqlen, ppl_limit=a.ppl_limit, tasks=tuple(a.tasks),
                     limit=a.limit, num_fewshot=a.num_fewshot, task_batch_size=a.task_batch_size,
                     fidelity=a.fidelity)
    rep = quantize(a.model, cfg, a.out, device=a.device, evals=evals, skip_eval=a.skip_eval, overwrite=a.overwrite, data_dir=a.data_dir,
                   trust_remote_code=a.trust_remote_code)
    if a.verbose:
        print(module_table(rep["modules"]))
    print(f"model {rep['model']['name']} ({rep['model']['architecture']}, {rep['model']['params']:,} params)")
    print(format_table(rep))
    fid = rep["metrics"].get("fidelity")
    if fid:
        print(f"routing fidelity: top-k set {fid['mean_topk_set_agreement']:.4f}, top-1 {fid['mean_top1_agreement']:.4f}; "
              f"KL(FP||quantized) {fid['kl_fp_to_quantized']:.5f} nats/token")
    if rep["fallbacks"]:
        print(f"{len(rep['fallbacks'])} linears used the {cfg.fallback} fallback (too few routed tokens); "
              "see report.json 'fallbacks'")
    if "size" in rep:
        s = rep["size"]
        print(f"checkpoint {s['checkpoint_bytes'] / 2**20:.1f} MiB (bf16: {s['bf16_bytes'] / 2**20:.1f} MiB) -> {a.out}")
    return 0


def _ppl_sets(ppl: tuple[str, ...]) -> tuple[str, ...]:
    return () if tuple(ppl) in (("none",), ()) else tuple(ppl)


def cmd_eval(a) -> int:
    from .evaluate.perplexity import evaluate_ppl
    from .evaluate.report import format_tasks
    from .models.loading import load_model
    from .utils.device import fits_on_device, resolve_device
    from .utils.fs import write_atomic

    device = resolve_device(a.device)
    loaded = load_model(a.model, device=device, trust_remote_code=a.trust_remote_code)
    if fits_on_device(loaded.model, device):
        loaded.model.to(device)
    res = evaluate_ppl(loaded.model, loaded.tokenizer, _ppl_sets(a.ppl), a.seqlen, a.data_dir, limit=a.ppl_limit)
    for name, r in res.items():
        print(f"{name:<10} ppl {r['ppl']:.3f}  bpb {r['bpb']:.4f}  ({r['windows']} windows x {r['seqlen']} tokens)")
    if a.tasks:
        from .evaluate.lm_eval import run_tasks

        res["tasks"] = run_tasks(loaded.model, loaded.tokenizer, list(a.tasks), a.limit, a.num_fewshot,
                                 a.task_batch_size, a.data_dir)
        print(format_tasks(res["tasks"]))
    if a.balance or a.against:
        from .evaluate.perplexity import default_seqlen, wikitext2_windows

        w = wikitext2_windows(loaded.tokenizer, default_seqlen(loaded.model, a.seqlen), a.data_dir).ids
        w = w[: a.ppl_limit] if a.ppl_limit else w
    if a.balance:
        from .evaluate.routing import expert_usage, usage_summary

        res["expert_balance"] = usage_summary(expert_usage(loaded.model, w))
        print(f"expert-balance std on WikiText-2 test: {res['expert_balance']['balance_std']:.4f}")
    if a.against:
        from .evaluate.fidelity import compare

        fp = load_model(a.against, device=device, trust_remote_code=a.trust_remote_code)
        res["fidelity"] = compare(fp.model, loaded.model, w[:64])
        f = res["fidelity"]
        print(f"routing fidelity vs {a.against}: top-k set {f['mean_topk_set_agreement']:.4f}, top-1 "
              f"{f['mean_top1_agreement']:.4f}; KL(FP||this) {f['kl_fp_to_quantized']:.5f} nats/token")
    if a.json:
        write_atomic(a.json, json.dumps(res, indent=2) + "\n")
    return 0


def cmd_calib(a) -> int:
    from .models.loading import load_model
    from .utils.device import fits_on_device, resolve_device

    device = resolve_device(a.device)
    if a.calib_cmd == "ebss":
        from .calib.ebss import EBSSConfig, generate, write_jsonl
        from .evaluate.routing import balance_std
        from .utils.fs import check_output

        check_output(a.out, a.overwrite)
        cfg = EBSSConfig(a.num, a.length, a.width, a.tau, a.seed, a.batch, no_repeat_ngram=a.no_repeat_ngram)
        loaded = load_model(a.model, device=device, trust_remote_code=a.trust_remote_code)
        if fits_on_device(loaded.model, device):
            loaded.model.to(device)
        rows, stats = generate(loaded.model, loaded.tokenizer, cfg, device)
        write_jsonl(rows, a.out)
        nll = sum(r["nll"] for r in rows) / len(rows)
        print(f"wrote {len(rows)} sequences x {a.length} tokens to {a.out} in {stats['seconds']:.1f}s "
              f"({stats['tokens_per_s']:.0f} tokens/s); mean NLL {nll:.3f}, mean per-sequence balance std "
              f"{sum(r['balance_std'] for r in rows) / len(rows):.4f}")
        return 0
    from .calib.windows import calibration_windows, token_rows_length
    from .evaluate.perplexity import default_seqlen
    from .evaluate.routing import expert_usage, usage_summary
    from .utils.fs import write_atomic

    loaded = load_model(a.model, device=device, trust_remote_code=a.trust_remote_code)
    seqlen = a.seqlen or token_rows_length(a.calib) or default_seqlen(loaded.model)  # a token set: its own length
    cs = calibration_windows(loaded.tokenizer, a.calib, a.nsamples, seqlen, a.seed, a.data_dir)
    summary = usage_summary(expert_usage(loaded.model, cs.ids))
    print(f"{cs.source}: {cs.ids.shape[0]} x {cs.ids.shape[1]} tokens; expert-balance std {summary['balance_std']:.4f}")
    for i, r in summary["layers"].items():
        print(f"  layer {i}: min/max share of uniform {r['min_rel_share']:.2f}/{r['max_rel_share']:.2f}  "
              f"counts {r['counts']}")
    if a.json:
        write_atomic(a.json, json.dumps({"calib": cs.describe(), "balance_std": summary["balance_std"],
                                         "layers": summary["layers"]}, indent=2) + "\n")
    return 0


def cmd_bench(a) -> int:
    from .bench import Grid, run

    if a.grid:
        grid = Grid.from_yaml(a.grid)
        if a.model:
            grid.model = a.model
    else:
        grid = Grid(model=a.model, methods=list(a.methods), bits=[int(b) for b in a.bits], group_size=a.group_size,
                    calib=list(a.calib), nsamples=a.nsamples, seqlen=a.seqlen, ppl=list(a.ppl),
                    ppl_limit=a.ppl_limit, tasks=list(a.tasks), limit=a.limit)
    run(grid, a.out, a.data_dir)
    print((Path(a.out) / "results.md").read_text())
    print(f"results.json, results.csv, results.md and plots in {a.out}")
    return 0


def _load_plan(path: str) -> BitPlan:
    from .allocate.planfile import load_plan

    return load_plan(path)


def _allocate_cmd(name: str):
    def run(a) -> int:
        from .allocate import commands

        return getattr(commands, name)(a)
    return run


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
        return {"quantize": cmd_quantize, "eval": cmd_eval, "calib": cmd_calib, "bench": cmd_bench,
                "models": cmd_models, "plan": _allocate_cmd("cmd_plan"),
                "profile": _allocate_cmd("cmd_profile")}[a.cmd](a)
    except (ValueError, DataNotFoundError, CheckpointError, UnsupportedArchitectureError, OutputExistsError) as e:
        print(f"moeq {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
