"""``moeq`` command line: quantize, eval, models. The only module that reads argv.

Every subcommand turns its flags into typed configs and calls the library; errors the user can fix
(bad bits, missing data, unreadable checkpoint, existing output) are printed as one line naming the
problem and the fix, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .config import BitPlan
from .flags import (add_common, add_eval_flags, add_max_memory, add_quant_flags, add_run_flags, csv_list, quant_config)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moeq", description="MoE-aware post-training quantization.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model, export compressed-tensors, report perplexity")
    add_quant_flags(q)
    q.add_argument("--out", required=True, help="output folder (checkpoint + report.json)")
    q.add_argument("--bits", type=int, default=4, help="weight bits, 2..8 (default 4)")
    q.add_argument("--plan", default=None,
                   help="bit plan file (.yaml/.json from `moeq plan`): per-module widths; replaces --bits/--group-size")
    add_eval_flags(q, "--eval-seqlen")
    q.add_argument("--fidelity", action="store_true",
                   help="also measure routing fidelity and KL(FP||quantized) on WikiText-2 (keeps an FP copy)")
    q.add_argument("--skip-eval", action="store_true", help="skip the perplexity and task evaluation")
    add_run_flags(q)
    add_common(q)

    e = sub.add_parser("eval", help="perplexity (and bits per byte) of a model or quantized checkpoint")
    e.add_argument("model", help="bundled name, checkpoint dir (quantized or not) or hub id")
    add_eval_flags(e, "--seqlen")
    e.add_argument("--balance", action="store_true",
                   help="expert-balance std and per-layer expert usage on the WikiText-2 test windows")
    e.add_argument("--against", default=None, metavar="FP_MODEL",
                   help="routing fidelity and KL(FP||this) against this full-precision model")
    e.add_argument("--json", default=None, help="write the results to this file")
    add_max_memory(e)
    add_common(e)

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
    add_common(ce)
    cs = csub.add_parser("stats", help="expert-balance std and per-layer expert usage of a calibration set")
    cs.add_argument("model", nargs="?", default=None)
    cs.add_argument("--calib", required=True, help="wikitext2, c4, gsm8k, humaneval, or a .txt/.jsonl path")
    cs.add_argument("--nsamples", type=int, default=128)
    cs.add_argument("--seqlen", type=int, default=None,
                    help="window length (default: a token-id .jsonl's own row length, else min(2048, context))")
    cs.add_argument("--seed", type=int, default=0)
    cs.add_argument("--json", default=None, help="write balance_std and per-layer counts here")
    add_common(cs)

    b = sub.add_parser("bench", help="grid of methods x bits x calibration sets, cached per cell, paper tables")
    b.add_argument("model", nargs="?", default=None)
    b.add_argument("--out", required=True, help="bench folder (reused: finished cells are skipped)")
    b.add_argument("--grid", default=None, help="YAML grid file (keys as the flags below); overrides them")
    b.add_argument("--methods", type=csv_list, default=("rtn", "gptq", "moequant"),
                   help="any `quantize --method`, or gptq-agq (default rtn,gptq,moequant)")
    b.add_argument("--bits", type=csv_list, default=("4", "3"))
    b.add_argument("--group-size", type=int, default=128)
    b.add_argument("--calib", type=csv_list, default=("wikitext2",), help="calibration sets for GPTQ-family methods")
    b.add_argument("--nsamples", type=int, default=128)
    b.add_argument("--seqlen", type=int, default=None)
    b.add_argument("--ppl", type=csv_list, default=("wikitext2", "c4"))
    b.add_argument("--ppl-limit", type=int, default=None)
    b.add_argument("--tasks", type=csv_list, default=())
    b.add_argument("--limit", type=int, default=None, help="first N examples per task")
    add_common(b)

    from .allocate.commands import add_parsers as add_allocate_parsers

    add_allocate_parsers(sub, add_common)  # moeq profile, moeq plan

    m = sub.add_parser("models", help="list the bundled models")
    m.add_argument("--json", action="store_true")
    mt = sub.add_parser("methods", help="list the quantization methods (one line each)")
    mt.add_argument("--json", action="store_true")
    return ap


def cmd_quantize(a) -> int:
    from .evaluate.report import format_table, module_table
    from .pipeline import EvalSpec, RunOptions, quantize

    cfg = quant_config(a, _load_plan(a.plan) if a.plan else None)
    evals = EvalSpec(ppl=_ppl_sets(a.ppl), seqlen=a.eval_seqlen, ppl_limit=a.ppl_limit, tasks=tuple(a.tasks),
                     limit=a.limit, num_fewshot=a.num_fewshot, task_batch_size=a.task_batch_size,
                     fidelity=a.fidelity)
    kill, _, sig = (a.kill_after_block or "").partition(":")
    options = RunOptions(max_memory=a.max_memory, offload_activations=a.offload_activations,
                         max_solve_memory=a.max_solve_memory, max_shard_size=a.max_shard_size, resume=a.resume,
                         kill_after_block=int(kill) if kill else None,
                         kill_signal={"INT": signal.SIGINT, "TERM": signal.SIGTERM}.get(sig, signal.SIGKILL))
    rep = quantize(a.model, cfg, a.out, device=a.device, evals=evals, skip_eval=a.skip_eval, overwrite=a.overwrite,
                   data_dir=a.data_dir, trust_remote_code=a.trust_remote_code, options=options)
    if a.verbose:
        print(module_table(rep["modules"]))
    print(f"model {rep['model']['name']} ({rep['model']['architecture']}, {rep['model']['params']:,} params)")
    print(format_table(rep))
    fid = rep["metrics"].get("fidelity")
    if fid:
        print(f"routing fidelity: top-k set {fid['mean_topk_set_agreement']:.4f}, top-1 {fid['mean_top1_agreement']:.4f}; "
              f"KL(FP||quantized) {fid['kl_fp_to_quantized']:.5f} nats/token")
    if rep["fallbacks"]:
        print(f"{len(rep['fallbacks'])} linears used the {rep['quant']['fallback']} fallback (too few routed tokens); "
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
    streamed = _streamed_eval(a, device)
    if streamed is not None:
        return streamed
    loaded = load_model(a.model, device=device, trust_remote_code=a.trust_remote_code)
    if fits_on_device(loaded.model, device):
        loaded.model.to(device)
    res = evaluate_ppl(loaded.model, loaded.tokenizer, _ppl_sets(a.ppl), a.seqlen, a.data_dir, limit=a.ppl_limit)
    _print_ppl(res)
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


def _print_ppl(res: dict) -> None:
    for name, r in res.items():
        print(f"{name:<10} ppl {r['ppl']:.3f}  bpb {r['bpb']:.4f}  ({r['windows']} windows x {r['seqlen']} tokens)")


def _streamed_eval(a, device) -> int | None:
    """Perplexity block by block when the model does not fit ``--max-memory``; None when it fits."""
    import torch

    from .evaluate.perplexity import default_seqlen
    from .evaluate.streamed import streamed_ppl
    from .models.lazy import CheckpointSource, module_bytes
    from .models.loading import compute_dtype, load_tokenizer, open_checkpoint
    from .utils.fs import write_atomic
    from .utils.memory import fmt_bytes, free_bytes

    info = open_checkpoint(a.model, a.trust_remote_code)
    dtype = compute_dtype(device, info.storage_dtype)
    src = CheckpointSource(info.path, info.config, dtype, info.storage_dtype, device, a.trust_remote_code)
    size, budget = module_bytes(src.model, dtype), a.max_memory or free_bytes("cpu") // 2
    if size <= budget:
        return None
    if a.tasks or a.balance or a.against:
        raise ValueError(f"the model takes {fmt_bytes(size)}, more than the memory budget of {fmt_bytes(budget)}: "
                         "its perplexity is computed block by block, but --tasks, --balance and --against need the "
                         "whole model; run them where it fits (or raise --max-memory)")
    print(f"model: {fmt_bytes(size)} in {str(dtype).replace('torch.', '')}, evaluated block by block", file=sys.stderr)
    with torch.no_grad():
        res = streamed_ppl(src, load_tokenizer(info.path, a.trust_remote_code), _ppl_sets(a.ppl),
                           default_seqlen(src.model, a.seqlen), a.data_dir, limit=a.ppl_limit, placement="cpu")
    _print_ppl(res)
    if a.json:
        write_atomic(a.json, json.dumps(res, indent=2) + "\n")
    return 0


def cmd_calib(a) -> int:
    from .models.loading import load_model
    from .utils.device import fits_on_device, resolve_device

    device = resolve_device(a.device)
    if a.calib_cmd == "ebss":
        from .calib.ebss import EBSSConfig, generate, write_jsonl
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


def cmd_methods(a) -> int:
    from .methods import METHODS

    if a.json:
        print(json.dumps([{k: v for k, v in vars(m).items()} for m in METHODS.values()], indent=2))
        return 0
    for m in METHODS.values():
        print(m.describe())
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


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from .calib.sources import DataNotFoundError
    from .export.partial import Interrupted
    from .models.loading import CheckpointError
    from .models.registry import UnsupportedArchitectureError
    from .utils.fs import OutputExistsError
    from .utils.progress import setup_logging

    ap = build_parser()
    a = ap.parse_args(argv)
    setup_logging(getattr(a, "verbose", False))
    if argv is None:  # the moeq process itself: SIGTERM (kill, a job scheduler) stops like Ctrl-C
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "calib": cmd_calib, "bench": cmd_bench,
                "models": cmd_models, "methods": cmd_methods, "plan": _allocate_cmd("cmd_plan"),
                "profile": _allocate_cmd("cmd_profile")}[a.cmd](a)
    except (ValueError, DataNotFoundError, CheckpointError, UnsupportedArchitectureError, OutputExistsError) as e:
        print(f"moeq {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"moeq {a.cmd}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"moeq {a.cmd}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
