"""``moeq`` command line: quantize, eval, calib, bench, profile, plan, check-serving, export, models, methods. The only module that
reads argv.

Every subcommand turns its flags into typed configs and calls the library. Numbers are checked as they
are parsed, output paths, data folders, evaluation sets and lengths (against the model's config) before
any model work (:mod:`moeq.preflight`). One error path (:func:`main`): a failure the user can fix (bad
bits, missing data, unreadable checkpoint, existing output) is one line ``moeq CMD: error: ...`` naming the
problem and the fix, exit status 2; any other failure is one "internal error" line, exit status 1; a
traceback only with -v/--debug; Ctrl-C and SIGTERM exit with status 130.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path

from . import __version__
from .config import BitPlan
from .flags import (BITS, LENGTH, POSITIVE, DefaultsHelpFormatter, add_common, add_eval_flags, add_max_memory,
                    add_quant_flags, add_run_flags, csv_list, csv_of, float_range, group_size_arg, no_repeat_ngram, quant_config)


class Parser(argparse.ArgumentParser):
    """Help texts end with each default; an unknown flag is reported with the usage of the subcommand it
    was given to (argparse itself reports it against the top-level usage)."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kw)
        self.set_defaults(_parser=self)

    def parse_args(self, args=None, namespace=None):
        a, extra = self.parse_known_args(args, namespace)
        if extra:
            a._parser.error(f"unrecognized arguments: {' '.join(extra)}")
        del a._parser
        return a


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="moeq", description="MoE-aware post-training quantization.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    q = sub.add_parser("quantize", help="quantize a model, export compressed-tensors, report perplexity")
    add_quant_flags(q)
    q.add_argument("--out", required=True, help="output folder (checkpoint + report.json)")
    q.add_argument("--bits", type=BITS, default=4, help="weight bits of every quantized linear, 2..8 (default 4)")
    q.add_argument("--plan", default=None,
                   help="bit plan file (.yaml/.json from `moeq plan`): per-module widths; replaces --bits/--group-size")
    add_eval_flags(q)
    q.add_argument("--fidelity", action="store_true",
                   help="also measure routing fidelity and KL(FP||quantized) on WikiText-2 (keeps an FP copy)")
    q.add_argument("--skip-eval", action="store_true", help="skip the perplexity and task evaluation")
    from .export.formats import parse_formats

    q.add_argument("--format", dest="formats", type=parse_formats, default=("compressed-tensors",),
                   help="what --out holds, comma-separated: compressed-tensors (transformers, vLLM, SGLang) and/or "
                        "gguf (llama.cpp: model.gguf from the same integers) (default compressed-tensors)")
    q.add_argument("--gguf-pre", default=None, help="llama.cpp pre-tokenizer name for --format gguf when moeq "
                                                    "cannot tell it (e.g. qwen2); GPT-2-style tokenizers need none")
    add_run_flags(q)
    add_common(q)

    e = sub.add_parser("eval", help="perplexity (and bits per byte) of a model or quantized checkpoint")
    e.add_argument("model", help="bundled name, checkpoint dir (quantized or not) or hub id")
    add_eval_flags(e, "--seqlen")  # --eval-seqlen, as in quantize and plan, or --seqlen
    e.add_argument("--balance", action="store_true",
                   help="expert-balance std and per-layer expert usage on the WikiText-2 test windows")
    e.add_argument("--against", default=None, metavar="FP_MODEL",
                   help="routing fidelity and KL(FP||this) against this full-precision model")
    e.add_argument("--json", default=None, help="write the results to this file (replaced if it exists)")
    add_max_memory(e)
    add_common(e)

    c = sub.add_parser("calib", help="calibration sets: generate EBSS, measure expert balance")
    csub = c.add_subparsers(dest="calib_cmd", required=True)
    ce = csub.add_parser("ebss", help="the model writes its own expert-balanced calibration set (MoEQuant EBSS)")
    ce.add_argument("model", nargs="?", default=None, help="bundled name, checkpoint dir or hub id (default: bundled)")
    ce.add_argument("--nsamples", "--num", dest="num", type=POSITIVE, default=128,
                    help="sequences (default 128; --num is accepted too, except under torchrun, whose own --numa-binding "
                         "it would be taken for)")
    ce.add_argument("--length", type=LENGTH, default=512, help="tokens per sequence, 2..context (default 512)")
    ce.add_argument("--width", type=POSITIVE, default=4, help="beam width (default 4)")
    ce.add_argument("--tau", type=float_range(0), default=1.2, help="balance temperature, > 0 (default 1.2)")
    ce.add_argument("--seed", type=int, default=0, help="seed of the random first tokens")
    ce.add_argument("--batch", type=POSITIVE, default=32, help="sequences generated together (x width rows)")
    ce.add_argument("--no-repeat-ngram", type=no_repeat_ngram, default=0,
                    help="a beam never repeats one of its n-grams (e.g. 3; default 0 = off, as in the paper)")
    ce.add_argument("--out", required=True, help="output .jsonl (input_ids, text, nll, balance_std per line)")
    ce.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_common(ce)
    cs = csub.add_parser("stats", help="expert-balance std and per-layer expert usage of a calibration set")
    cs.add_argument("model", nargs="?", default=None, help="bundled name, checkpoint dir or hub id (default: bundled)")
    cs.add_argument("--calib", required=True, help="wikitext2, c4, gsm8k, humaneval, or a .txt/.jsonl path")
    cs.add_argument("--nsamples", type=POSITIVE, default=128, help="calibration windows")
    cs.add_argument("--seqlen", type=LENGTH, default=None,
                    help="window length, 2..context (default: a token-id .jsonl's own row length, else "
                         "min(2048, context))")
    cs.add_argument("--seed", type=int, default=0, help="window sampling seed")
    cs.add_argument("--json", default=None, help="write balance_std and per-layer counts here")
    add_common(cs)

    b = sub.add_parser("bench", help="grid of methods x bits x calibration sets, cached per cell, paper tables")
    b.add_argument("model", nargs="?", default=None, help="bundled name, checkpoint dir or hub id (default: bundled)")
    b.add_argument("--out", required=True, help="bench folder (reused: finished cells are skipped)")
    b.add_argument("--grid", default=None, help="YAML grid file (keys as the flags below); overrides them")
    b.add_argument("--methods", type=csv_list, default=("rtn", "gptq", "moequant"),
                   help="any `quantize --method`, or gptq-agq (default rtn,gptq,moequant)")
    b.add_argument("--bits", type=csv_of(BITS, "bit widths"), default=(4, 3), help="weight widths, each 2..8")
    b.add_argument("--group-size", type=group_size_arg, default=128, help="-1 = per channel, or e.g. 32/64/128")
    b.add_argument("--calib", type=csv_list, default=("wikitext2",), help="calibration sets for GPTQ-family methods")
    b.add_argument("--nsamples", type=POSITIVE, default=128, help="calibration windows")
    b.add_argument("--seqlen", type=LENGTH, default=None,
                   help="calibration and evaluation window, 2..context (default: min(2048, context))")
    b.add_argument("--ppl", type=csv_list, default=("wikitext2", "c4"), help="perplexity sets (or none)")
    b.add_argument("--ppl-limit", type=POSITIVE, default=None, help="first N >= 1 windows of each set (default: all)")
    b.add_argument("--tasks", type=csv_list, default=(), help="downstream tasks (see `moeq eval --help`)")
    b.add_argument("--limit", type=POSITIVE, default=None, help="first N >= 1 examples per task (default: all)")
    add_common(b)

    from .allocate.commands import add_parsers as add_allocate_parsers

    add_allocate_parsers(sub, add_common)  # moeq profile, moeq plan
    from .export.commands import add_parsers as add_export_parsers

    add_export_parsers(sub, add_common)  # moeq check-serving

    m = sub.add_parser("models", help="list the bundled models")
    m.add_argument("--json", action="store_true", help="as JSON")
    mt = sub.add_parser("methods", help="list the quantization methods (one line each)")
    mt.add_argument("--json", action="store_true", help="as JSON")
    return ap


def _check_eval_flags(a) -> None:
    """Perplexity sets and tasks exist (before any model is read)."""
    from .preflight import check_ppl_sets, check_tasks

    check_ppl_sets(_ppl_sets(a))
    check_tasks(a.tasks, a.num_fewshot)


def _open_checked(a, lengths: dict[str, int | None]):
    """The checkpoint's config (no weights) and the given lengths checked against its context."""
    from .models.loading import open_checkpoint
    from .preflight import check_lengths

    info = open_checkpoint(a.model, a.trust_remote_code, getattr(a, "allow_pickle", False))
    check_lengths(info.config, lengths)
    return info


def cmd_quantize(a) -> int:
    from .evaluate.report import format_table, module_table
    from .pipeline import EvalSpec, RunOptions, quantize

    if a.allow_pickle:
        raise ValueError("--allow-pickle: quantize reads the weights block by block from safetensors only; convert "
                         "the checkpoint with model.save_pretrained(DIR, safe_serialization=True) and quantize DIR")
    _check_eval_flags(a)
    cfg = quant_config(a, _load_plan(a.plan) if a.plan else None)
    if a.seqlen or a.eval_seqlen:
        _open_checked(a, {"--seqlen": a.seqlen, "--eval-seqlen": a.eval_seqlen})
    evals = EvalSpec(ppl=_ppl_sets(a), seqlen=a.eval_seqlen, ppl_limit=a.ppl_limit, tasks=tuple(a.tasks),
                     limit=a.limit, num_fewshot=a.num_fewshot, task_batch_size=a.task_batch_size,
                     fidelity=a.fidelity)
    hook, _, on_rank = (a.kill_after_block or "").partition("@")  # test hook: N[:INT|:TERM][@RANK]
    kill, _, sig = hook.partition(":")
    kill = kill if not on_rank or int(on_rank) == a.dist.rank else ""
    options = RunOptions(max_memory=a.max_memory, offload_activations=a.offload_activations,
                         max_solve_memory=a.max_solve_memory, max_shard_size=a.max_shard_size, resume=a.resume,
                         fp_cache=a.fp_cache, dist=a.dist, formats=a.formats, gguf_pre=a.gguf_pre,
                         kill_after_block=int(kill) if kill else None,
                         kill_signal={"INT": signal.SIGINT, "TERM": signal.SIGTERM}.get(sig, signal.SIGKILL))
    rep = quantize(a.model, cfg, a.out, device=a.device, evals=evals, skip_eval=a.skip_eval, overwrite=a.overwrite,
                   data_dir=a.data_dir, trust_remote_code=a.trust_remote_code, options=options)
    if not a.dist.main:
        return 0
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
    for note in rep["notes"]:
        print(f"note: {note}")
    if "size" in rep and "compressed-tensors" in a.formats:
        s = rep["size"]
        print(f"checkpoint {s['checkpoint_bytes'] / 2**20:.1f} MiB (bf16: {s['bf16_bytes'] / 2**20:.1f} MiB) -> {a.out}")
    if "gguf" in rep:
        g = rep["gguf"]
        print(f"GGUF {g['bytes'] / 2**20:.1f} MiB ({', '.join(f'{n} {t}' for t, n in sorted(g['types'].items()))}) "
              f"-> {Path(a.out) / 'model.gguf'}")
    return 0


def _ppl_sets(a) -> tuple[str, ...]:
    """--ppl as given; unset: WikiText-2, or nothing when --tasks asks for downstream tasks instead."""
    ppl = a.ppl if a.ppl is not None else () if a.tasks else ("wikitext2",)
    return () if tuple(ppl) in (("none",), ()) else tuple(ppl)


def _check_against(a) -> None:
    """--against resolves to a supported checkpoint before the evaluation starts."""
    from .models.loading import CheckpointError, open_checkpoint

    try:
        open_checkpoint(a.against, a.trust_remote_code, a.allow_pickle)
    except CheckpointError as e:
        raise CheckpointError(f"--against: {e}") from None


def cmd_eval(a) -> int:
    from .evaluate.perplexity import evaluate_ppl
    from .evaluate.report import format_tasks
    from .models.loading import load_model
    from .preflight import output_file
    from .utils.device import resolve_device
    from .utils.fs import write_atomic

    if a.json is not None:
        output_file(a.json, "--json")
    _check_eval_flags(a)
    if a.dist.enabled and (a.tasks or a.balance or a.against):
        raise ValueError("under torchrun moeq eval measures perplexity only; run --tasks, --balance and --against "
                         "without torchrun")
    info = _open_checked(a, {"--seqlen": a.eval_seqlen})
    if a.against:
        _check_against(a)
    device = resolve_device(a.device)
    streamed = _streamed_eval(a, device, info)
    if streamed is not None:
        return streamed
    loaded = _load(a, device)
    res = evaluate_ppl(loaded.model, loaded.tokenizer, _ppl_sets(a), a.eval_seqlen, a.data_dir,
                       limit=a.ppl_limit, dist=a.dist)
    if not a.dist.main:
        return 0
    _print_ppl(res)
    if a.tasks:
        from .evaluate.lm_eval import run_tasks

        res["tasks"] = run_tasks(loaded.model, loaded.tokenizer, list(a.tasks), a.limit, a.num_fewshot,
                                 a.task_batch_size, a.data_dir)
        print(format_tasks(res["tasks"]))
    if a.balance or a.against:
        from .evaluate.perplexity import default_seqlen, wikitext2_windows

        w = wikitext2_windows(loaded.tokenizer, default_seqlen(loaded.model, a.eval_seqlen), a.data_dir).ids
        w = w[: a.ppl_limit] if a.ppl_limit else w
    if a.balance:
        from .evaluate.routing import expert_usage, usage_summary

        res["expert_balance"] = usage_summary(expert_usage(loaded.model, w))
        print(f"expert-balance std on WikiText-2 test: {res['expert_balance']['balance_std']:.4f}")
    if a.against:
        from .evaluate.fidelity import compare

        fp = load_model(a.against, device=device, trust_remote_code=a.trust_remote_code, allow_pickle=a.allow_pickle)
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


def _streamed_eval(a, device, info) -> int | None:
    """Perplexity block by block when the model does not fit ``--max-memory``; None when it fits (and for
    pickle checkpoints, which cannot be read block by block)."""
    import torch

    from .evaluate.perplexity import default_seqlen
    from .evaluate.streamed import streamed_ppl
    from .models.lazy import CheckpointSource, module_bytes
    from .models.loading import compute_dtype, load_tokenizer, weight_files
    from .utils.fs import write_atomic
    from .utils.memory import fmt_bytes, free_bytes

    if not weight_files(info.path)[0]:
        return None
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
        res = streamed_ppl(src, load_tokenizer(info.path, a.trust_remote_code), _ppl_sets(a),
                           default_seqlen(src.model, a.eval_seqlen), a.data_dir, limit=a.ppl_limit,
                           placement="cpu", dist=a.dist)
    if not a.dist.main:
        return 0
    _print_ppl(res)
    if a.json:
        write_atomic(a.json, json.dumps(res, indent=2) + "\n")
    return 0


def cmd_calib(a) -> int:
    return cmd_calib_ebss(a) if a.calib_cmd == "ebss" else cmd_calib_stats(a)


def _load(a, device):
    """The whole model, on ``device`` when it fits."""
    from .models.loading import load_model
    from .utils.device import fits_on_device

    loaded = load_model(a.model, device=device, trust_remote_code=a.trust_remote_code, allow_pickle=a.allow_pickle)
    if fits_on_device(loaded.model, device):
        loaded.model.to(device)
    return loaded


def cmd_calib_ebss(a) -> int:
    from .calib.ebss import EBSSConfig, generate, write_jsonl
    from .preflight import output_file
    from .utils.device import resolve_device

    output_file(a.out, "--out", a.overwrite)
    cfg = EBSSConfig(a.num, a.length, a.width, a.tau, a.seed, a.batch, no_repeat_ngram=a.no_repeat_ngram)
    _open_checked(a, {"--length": a.length})
    device = resolve_device(a.device)
    loaded = _load(a, device)
    rows, stats = generate(loaded.model, loaded.tokenizer, cfg, device, a.dist)
    if not a.dist.main:
        return 0
    write_jsonl(rows, a.out)
    nll = sum(r["nll"] for r in rows) / len(rows)
    print(f"wrote {len(rows)} sequences x {a.length} tokens to {a.out} in {stats['seconds']:.1f}s "
          f"({stats['tokens_per_s']:.0f} tokens/s); mean NLL {nll:.3f}, mean per-sequence balance std "
          f"{sum(r['balance_std'] for r in rows) / len(rows):.4f}")
    return 0


def cmd_calib_stats(a) -> int:
    from .calib.windows import calibration_windows, token_rows_length
    from .evaluate.perplexity import default_seqlen
    from .evaluate.routing import expert_usage, usage_summary
    from .models.loading import load_tokenizer
    from .preflight import output_file
    from .utils.device import resolve_device
    from .utils.fs import write_atomic

    if a.json is not None:
        output_file(a.json, "--json")
    info = _open_checked(a, {"--seqlen": a.seqlen})
    rows = token_rows_length(a.calib) if a.seqlen is None else None  # a token set: its own length
    seqlen = a.seqlen or default_seqlen(info.config, rows, f"the row length of {a.calib}" if rows else "--seqlen")
    cs = calibration_windows(load_tokenizer(info.path, a.trust_remote_code), a.calib, a.nsamples, seqlen, a.seed,
                             a.data_dir)  # the set is read (and refused) before the model is loaded
    loaded = _load(a, resolve_device(a.device))
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
    from .preflight import output_folder

    output_folder(a.out, "--out")
    if a.grid:
        grid = Grid.from_yaml(a.grid)
        if a.model:
            grid.model = a.model
    else:
        grid = Grid(model=a.model, methods=list(a.methods), bits=list(a.bits), group_size=a.group_size,
                    calib=list(a.calib), nsamples=a.nsamples, seqlen=a.seqlen, ppl=list(a.ppl),
                    ppl_limit=a.ppl_limit, tasks=list(a.tasks), limit=a.limit)
    run(grid, a.out, a.data_dir, trust_remote_code=a.trust_remote_code, allow_pickle=a.allow_pickle)
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


def _export_cmd(name: str):
    def run(a) -> int:
        from .export import commands

        return getattr(commands, name)(a)
    return run


def cmd_methods(a) -> int:
    from .methods import METHODS, single_process_reason

    if a.json:
        print(json.dumps([{**vars(m), "distributed": single_process_reason(m.name) is None} for m in METHODS.values()],
                         indent=2))
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


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "calib": cmd_calib, "bench": cmd_bench,
            "models": cmd_models, "methods": cmd_methods, "plan": _allocate_cmd("cmd_plan"),
            "profile": _allocate_cmd("cmd_profile"), "check-serving": _export_cmd("cmd_check_serving"),
            "export": _export_cmd("cmd_export")}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(name: str, problem: str, code: int, verbose: bool) -> int:
    """Print the error as one line (after the traceback with -v); return the exit status."""
    if verbose:
        traceback.print_exc()
    print(f"moeq {name}: error: {_one_line(problem)}", file=sys.stderr)
    return code


def _runtime_problem(e: Exception, verbose: bool) -> str:
    """The one line for a failure that is not the user's input: out of memory, the OS, or a bug."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return (f"out of memory ({type(e).__name__}: {e}); lower --batch-size or --nsamples, or set --max-memory "
                "so the model is streamed block by block")
    if isinstance(e, OSError):
        return str(e)
    return (f"internal error: {type(e).__name__}: {e}; "
            + ("the traceback is above" if verbose else "rerun with -v for the traceback"))


def main(argv: list[str] | None = None) -> int:
    from .calib.sources import DataNotFoundError
    from .export.partial import Interrupted
    from .preflight import check_data_dir
    from .utils import dist as distributed
    from .utils.fs import OutputExistsError
    from .utils.progress import setup_logging

    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    verbose = getattr(a, "verbose", False)
    rank = int(os.environ.get("RANK", "0")) if distributed.launched() else 0
    if rank and argv is None:  # torchrun: the other ranks print only their errors
        os.environ["MOEQ_QUIET"] = "1"
    setup_logging(verbose)
    if argv is None:  # the moeq process itself: SIGTERM (kill, a job scheduler) stops like Ctrl-C
        signal.signal(signal.SIGTERM, _terminate)
        if os.environ.get("MOEQ_QUIET") == "1":  # transformers' and the hub's bars too (read when they load)
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    name = f"calib {a.calib_cmd}" if a.cmd == "calib" else a.cmd
    name += f" [rank {rank}]" if rank else ""
    try:
        if hasattr(a, "data_dir"):
            check_data_dir(a.data_dir)
        a.dist = _join_ranks(a, name) if distributed.launched() else distributed.Dist()
        return COMMANDS[a.cmd](a)
    except (ValueError, DataNotFoundError, OutputExistsError) as e:  # every moeq user error is one of these
        return _fail(name, str(e), 2, verbose)
    except Interrupted as e:
        print(f"moeq {name}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"moeq {name}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one error path: never a bare traceback
        return _fail(name, _runtime_problem(e, verbose), 1, verbose)
    finally:
        distributed.shutdown()


DISTRIBUTED = ("quantize", "eval", "calib ebss")  # what runs on several ranks (torchrun)


def _join_ranks(a, name: str):
    """Under torchrun: join the process group; this rank's device replaces --device."""
    from .utils.dist import init_from_env

    if name.split(" [")[0] not in DISTRIBUTED:
        raise ValueError(f"moeq {name.split(' [')[0]} runs in one process; under torchrun only "
                         f"{', '.join(DISTRIBUTED)} run (start it without torchrun)")
    dist, a.device = init_from_env(a.device, a.dist_timeout)
    return dist


if __name__ == "__main__":
    sys.exit(main())
