"""The command line's flags, declared once: what ``moeq quantize``, ``profile``, ``plan``, ``eval`` share,
and how the quantization flags become a :class:`~moeq.config.QuantConfig` (the library fills in the
method's defaults for flags left unset). Parsing argv itself happens in :mod:`moeq.cli` only.
"""

from __future__ import annotations

import argparse

from .config import COVERAGE, FALLBACKS, AWQKnobs, BitPlan, CalibSpec, GPTQKnobs, LWCKnobs, QuantConfig, TuneKnobs
from .quant.act import ActQuantArgs
from .quant.primitives import QuantArgs
from .solvers.blocktune import TUNE_PRECISIONS, TUNE_STARTS


def csv_list(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _bounds(lo, hi) -> str:
    return f">= {lo}" if hi is None else f"in {lo}..{hi}"


def int_range(lo: int, hi: int | None = None):
    """An argparse ``type``: an integer in lo..hi (no upper bound when ``hi`` is None); argparse prefixes
    the message with the flag, e.g. "argument --limit: must be >= 1, got 0"."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {_bounds(lo, hi)}, got {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi)}, got {v}")
        return v
    parse.__name__ = "int"
    return parse


def float_range(lo: float, hi: float | None = None, hi_closed: bool = False, lo_closed: bool = False):
    """An argparse ``type``: a number > lo (>= lo with ``lo_closed``) and < hi (<= hi with ``hi_closed``; no
    upper bound when None)."""
    what = (f">{'=' if lo_closed else ''} {lo}" if hi is None
            else f"in {'[' if lo_closed else '('}{lo}, {hi}{']' if hi_closed else ')'}")

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {what}, got {s!r}") from None
        if not ((v > lo or (lo_closed and v == lo)) and (hi is None or v < hi or (hi_closed and v == hi))):
            raise argparse.ArgumentTypeError(f"must be a number {what}, got {s}")
        return v
    parse.__name__ = "float"
    return parse


def group_size_arg(s: str) -> int:
    """--group-size: -1 (per channel) or a positive integer."""
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v != -1 and v < 1:
        raise argparse.ArgumentTypeError(f"group size must be -1 (per channel) or a positive integer, got {s!r}")
    return v


def no_repeat_ngram(s: str) -> int:
    v = int_range(0)(s)
    if v == 1:
        raise argparse.ArgumentTypeError("must be 0 (off) or >= 2, got 1")
    return v


def one_of(choices, what: str):
    """An argparse ``type`` (or :func:`csv_of` item): one of ``choices``."""
    def parse(s: str) -> str:
        if s.strip() not in choices:
            raise argparse.ArgumentTypeError(f"unknown {what} {s.strip()!r}; choose from {', '.join(choices)}")
        return s.strip()
    parse.__name__ = what
    return parse


def csv_of(item, what: str = "values"):
    """An argparse ``type``: a non-empty comma-separated list, each item parsed by ``item``."""
    def parse(s: str) -> tuple:
        vals = tuple(item(x) for x in csv_list(s))
        if not vals:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}")
        return vals
    parse.__name__ = "list"
    return parse


POSITIVE = int_range(1)  # counts, limits, batch sizes
LENGTH = int_range(2)  # sequence and window lengths (a window needs an input and a target token)
BITS = int_range(2, 8)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option that takes a value ends its help with the default, unless the help already states one
    (or there is none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (not action.option_strings or action.nargs == 0 or "default" in text or d is None or d == ()
                or d is argparse.SUPPRESS):
            return text
        shown = ",".join(map(str, d)) if isinstance(d, (tuple, list)) else str(d)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N] (default auto)")
    p.add_argument("--data-dir", default=None,
                   help="data folder, must exist (default: $MOEQ_DATA_DIR, then ../shared/data)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow remote-code model classes")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load a checkpoint whose weights are only pickle files (.bin/.pt) with torch.load("
                        "weights_only=True); by default moeq reads safetensors only")
    p.add_argument("--dist-timeout", type=float_range(0), default=1800, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others before the run fails instead of hanging")
    p.add_argument("-v", "--verbose", "--debug", dest="verbose", action="store_true",
                   help="debug logging, per-module tables, and the full traceback of an error")


def fewshot(s: str) -> dict[str, int]:
    """"mmlu=5,gsm8k=8" -> {"mmlu": 5, "gsm8k": 8}."""
    out = {}
    for part in csv_list(s):
        name, _, n = part.partition("=")
        if not n.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--num-fewshot expects task=N pairs with N >= 0, e.g. mmlu=5,gsm8k=8; "
                                             f"got {part!r}")
        out[name.strip()] = int(n)
    return out


def add_task_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=csv_list, default=(),
                   help="downstream tasks through lm-evaluation-harness, offline: hellaswag,piqa,boolq,copa,"
                        "openbookqa,winogrande,arc_easy,arc_challenge,mmlu,mathqa,gsm8k,humaneval,lambada")
    p.add_argument("--limit", type=POSITIVE, default=None,
                   help="first N >= 1 examples of each task (each MMLU subject; default: all)")
    p.add_argument("--num-fewshot", type=fewshot, default=None,
                   help="per-task shots, e.g. mmlu=5,gsm8k=8 (default: each task's own)")
    p.add_argument("--task-batch-size", type=POSITIVE, default=8, help="task requests per forward")


def add_quant_flags(p: argparse.ArgumentParser, method: str = "gptq", group_size: int | None = 128) -> None:
    """The quantization flags of ``moeq quantize``, ``moeq profile`` and ``moeq plan``, declared once.
    Flags left unset (None) take the method's defaults from the registry (``moeq methods``)."""
    from .methods import method_names

    p.add_argument("model", nargs="?", default=None, help="bundled name, checkpoint dir or hub id (default: bundled)")
    p.add_argument("--method", choices=method_names(), default=method, help="see `moeq methods` (default %(default)s)")
    unset = " (default 128, or the profile's)" if group_size is None else ""
    p.add_argument("--group-size", type=group_size_arg, default=group_size,
                   help="-1 = per channel, or e.g. 32/64/128" + unset)
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with zero points")
    p.add_argument("--kquant-scales", action="store_true",
                   help="llama.cpp's K-quant grids, stored exactly by --format gguf: with --sym --group-size 16, "
                        "--bits 2-3 -> Q3_K, 4-6 -> Q6_K (3.4 / 6.6 bits per weight); with --asym (float minima, "
                        "GGUF only) --bits 2 --group-size 16 -> Q2_K, --bits 4 / 5 --group-size 32 -> Q4_K / Q5_K "
                        "(2.6 / 4.5 / 5.5 bits per weight)")
    p.add_argument("--full-range", action="store_true",
                   help="symmetric grid on all 2^b integers: scale +-max|w| / 2^(b-1), signed so that the larger "
                        "extreme is exact (auto-round's and llama.cpp's Q4_0 rule; better at 2-3 bits)")
    p.add_argument("--calib", default=None,
                   help="wikitext2, c4, gsm8k, humaneval, ebss (self-generated, cached), any text file (.jsonl/.json "
                        "'text' field, .parquet, plain text) or a .jsonl of input_ids rows (default: the method's)")
    p.add_argument("--ebss-width", type=POSITIVE, default=4, help="EBSS beam width (default 4)")
    p.add_argument("--ebss-tau", type=float_range(0), default=1.2, help="EBSS balance temperature (default 1.2)")
    p.add_argument("--ebss-no-repeat-ngram", type=no_repeat_ngram, default=0,
                   help="EBSS beams never repeat one of their n-grams (e.g. 3; default 0 = off, as in the paper)")
    p.add_argument("--agq", action=argparse.BooleanOptionalAction, default=None,
                   help="affinity-guided Hessians for routed and shared experts (default: the method's)")
    p.add_argument("--agq-gate-proj", action=argparse.BooleanOptionalAction, default=True,
                   help="also weight the experts' gate_proj (MoEQuant Eq. 17; default on)")
    p.add_argument("--nsamples", type=POSITIVE, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=LENGTH, default=None,
                   help="calibration window length, 2..context (default: min(2048, context))")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--act-order", action="store_true", help="GPTQ act-order (static groups)")
    p.add_argument("--damp", type=float_range(0, 1), default=0.01,
                   help="GPTQ relative damping, in (0, 1) (default 0.01)")
    p.add_argument("--blocksize", type=POSITIVE, default=128, help="GPTQ lazy-update block size (default 128)")
    p.add_argument("--mse-clip", action=argparse.BooleanOptionalAction, default=None,
                   help="MSE clip search for scales, RTN and GPTQ (default: the method's)")
    p.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="QuaRot: fuse norms, rotate the residual stream by a random Hadamard (default: the method's)")
    p.add_argument("--rotation-seed", type=int, default=0, help="seed of the random Hadamard signs")
    p.add_argument("--act-bits", type=BITS, default=None,
                   help="also fake-quantize every quantized linear's input per token (W*A*, e.g. 4); evaluation only "
                        "unless --no-online-hadamard")
    p.add_argument("--act-clip", type=float_range(0, 1, hi_closed=True), default=1.0,
                   help="per-token activation range ratio, in (0, 1] (default 1.0; QuaRot: 0.9)")
    p.add_argument("--online-hadamard", action=argparse.BooleanOptionalAction, default=True,
                   help="with --act-bits: online Hadamard before every down projection (default on)")
    p.add_argument("--awq-grid", type=POSITIVE, default=20, help="AWQ scale-exponent grid points (default 20)")
    p.add_argument("--awq-clip", action=argparse.BooleanOptionalAction, default=True,
                   help="AWQ output-aware clip search after the scales (default on)")
    p.add_argument("--lwc-epochs", type=POSITIVE, default=2, help="lwc: epochs per block (default 2; OmniQuant 20)")
    p.add_argument("--lwc-lr", type=float_range(0), default=5e-2, help="lwc: learning rate (default 5e-2)")
    p.add_argument("--gptaq", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ-based methods: match the FP model's outputs on its own activations (GPTAQ; default: "
                        "the method's, on for --method gptaq)")
    p.add_argument("--tune-steps", type=int_range(0), default=200,
                   help="blocktune: signed-gradient steps per block, one calibration batch each (default 200)")
    p.add_argument("--tune-lr", type=float_range(0), default=0.01,
                   help="blocktune: initial step of the rounding offsets, decayed linearly to 0 (default 0.01)")
    p.add_argument("--tune-scale-lr", type=float_range(0, None, lo_closed=True), default=0.01,
                   help="blocktune: initial step of the scale factors (default 0.01; 0 keeps the solved scales)")
    p.add_argument("--tune-router", type=float_range(0, None, lo_closed=True), default=0.1,
                   help="blocktune: weight of the router KL term (default 0.1; 0 turns it off)")
    p.add_argument("--tune-expert", type=float_range(0, None, lo_closed=True), default=0.1,
                   help="blocktune: weight of the affinity-weighted expert-output term (default 0.1; 0 turns it off)")
    p.add_argument("--tune-start", choices=TUNE_STARTS, default="rtn",
                   help="blocktune: the grid it starts from, rtn (SignRound's start, default) or gptaq")
    p.add_argument("--tune-precision", choices=TUNE_PRECISIONS, default="auto",
                   help="blocktune: the tuning steps' matmuls, bf16 autocast or fp32; auto (default): bf16 where the "
                        "device runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32")
    p.add_argument("--tune-asymmetric", action=argparse.BooleanOptionalAction, default=True,
                   help="blocktune: targets from the FP model's own activations, carried next to the quantized ones "
                        "(default); --no-tune-asymmetric: the FP block on the quantized inputs (auto-round's way)")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="solve a block's linears group by group (q,k,v -> o -> gate/up -> down), each group's "
                        "statistics taken after the previous groups are quantized (default); --no-true-sequential: "
                        "one statistics pass per block for all its linears, about half the forwards")
    p.add_argument("--expert-coverage", choices=COVERAGE, default="routed",
                   help="routed: expert statistics from routed tokens only; all: every token through every "
                        "expert for statistics (outputs still combine routed experts only)")
    p.add_argument("--min-tokens", type=int_range(0), default=8,
                   help="experts with fewer routed tokens use --fallback (default 8)")
    p.add_argument("--fallback", choices=FALLBACKS, default="rtn",
                   help="how experts with fewer than --min-tokens routed tokens are quantized (default rtn)")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="calibration sequences per block forward (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def quant_config(a, plan: BitPlan | None = None) -> QuantConfig:
    """The QuantConfig the quantization flags describe (``plan``: default uniform at --bits/--group-size)."""
    full = getattr(a, "full_range", False)
    if plan is None:  # QuantArgs refuses --full-range with --asym / --kquant-scales
        plan = BitPlan(default=QuantArgs(a.bits, a.group_size, a.sym, getattr(a, "kquant_scales", False),
                                         full_range=full))
    elif full:  # a plan file: its symmetric schemes
        plan = plan.full_range()
    return QuantConfig(
        method=a.method, plan=plan,
        calib=CalibSpec(a.calib, a.nsamples, a.seqlen, a.seed, a.ebss_width, a.ebss_tau, a.ebss_no_repeat_ngram),
        gptq=GPTQKnobs(a.blocksize, a.damp, a.act_order), expert_coverage=a.expert_coverage,
        true_sequential=a.true_sequential, min_tokens=a.min_tokens, fallback=a.fallback, mse_clip=a.mse_clip,
        batch_size=a.batch_size, gptaq=a.gptaq, agq=a.agq, agq_gate_proj=a.agq_gate_proj,
        awq=AWQKnobs(grid=a.awq_grid, clip=a.awq_clip), lwc=LWCKnobs(epochs=a.lwc_epochs, lr=a.lwc_lr),
        tune=TuneKnobs(steps=a.tune_steps, lr=a.tune_lr, scale_lr=a.tune_scale_lr, router=a.tune_router,
                       expert=a.tune_expert, asymmetric=a.tune_asymmetric, start=a.tune_start,
                       precision=a.tune_precision),
        rotate=a.rotate, rotate_seed=a.rotation_seed, online_hadamard=a.online_hadamard,
        act=ActQuantArgs(a.act_bits, a.act_clip) if a.act_bits else None)


def size_flag(flag: str):
    def parse(s: str) -> int:
        from .utils.memory import parse_size

        try:
            return parse_size(s, flag)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def add_eval_flags(p: argparse.ArgumentParser, *seqlen_aliases: str) -> None:
    """Perplexity sets and windows, and the downstream tasks. The window is --eval-seqlen everywhere (``moeq eval``
    also accepts --seqlen: it has no calibration window to confuse it with)."""
    p.add_argument("--ppl", type=csv_list, default=None,
                   help="perplexity sets, e.g. wikitext2,c4, or none (default: wikitext2, or none when --tasks is given)")
    p.add_argument("--eval-seqlen", *seqlen_aliases, dest="eval_seqlen", type=LENGTH, default=None,
                   help="evaluation window, 2..context (default: min(2048, context))")
    p.add_argument("--ppl-limit", type=POSITIVE, default=None,
                   help="only the first N >= 1 windows of each set (quick checks; default: all)")
    add_task_flags(p)


def add_max_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", type=size_flag("--max-memory"), default=None, metavar="SIZE",
                   help="RAM the whole model may take in memory (default: half the free RAM); a bigger model is "
                        "streamed block by block from its shards and its perplexity computed the same way")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Memory, disk and resume: how a run executes (never what it computes)."""
    add_max_memory(p)
    p.add_argument("--offload-activations", choices=("auto", "device", "cpu", "disk"), default="auto",
                   help="where calibration activations live between blocks (default auto: device, else CPU RAM, "
                        "else disk, by what each has free)")
    p.add_argument("--max-solve-memory", type=size_flag("--max-solve-memory"), default=None, metavar="SIZE",
                   help="memory for one group's Hessians and batched solves (default: half the free memory of a "
                        "GPU, at most 1GiB on CPU); "
                        "results are identical whatever the split")
    p.add_argument("--max-shard-size", type=size_flag("--max-shard-size"), default=5 * 10**9, metavar="SIZE",
                   help="largest output shard (default 5GB)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command from its last finished block")
    p.add_argument("--no-fp-cache", dest="fp_cache", action="store_false",
                   help="evaluate the FP model again even when an earlier run on the same model files and evaluation "
                        "settings cached its figures")
    p.add_argument("--kill-after-block", default=None, help=argparse.SUPPRESS)  # test hook: N, N:INT or N:TERM, @RANK
