"""``moeq profile`` and ``moeq plan``: their flags and what they run (argv itself is parsed by moeq.cli).

``moeq profile MODEL --out DIR`` measures a :class:`~moeq.allocate.profile.Profile` on the calibration
set and writes ``profile.json``, ``predictors.safetensors`` and PNG figures. ``moeq plan MODEL --out
PLAN`` turns a profile (``--profile DIR``, or one measured on the spot) into a bit plan, from
QuantMoE-Bench rules or, with ``--avg-bits``, by the budgeted search; ``--measure`` then quantizes
with the plan and reports the predicted against the measured error and perplexity.
"""

from __future__ import annotations

import argparse
import json

from ..config import BitPlan, QuantConfig
from ..quant.primitives import QuantArgs
from .plan import PlanRules, Selection
from .search import METHODS as SEARCHES


def _widths(s: str) -> tuple[int, ...]:
    """--candidates: a non-empty comma-separated list of widths, each 2..8."""
    from ..flags import BITS, csv_of

    return csv_of(BITS, "bit widths like 2,3,4,8")(s)


def _add_calib_flags(p: argparse.ArgumentParser) -> None:
    """``moeq quantize``'s quantization flags (declared once, in moeq.cli) plus the profile's own."""
    from ..flags import add_quant_flags

    add_quant_flags(p, method="gptq", group_size=None)
    from ..flags import POSITIVE

    p.add_argument("--candidates", type=_widths, default=(2, 3, 4, 8),
                   help="widths to profile, each 2..8 (default 2,3,4,8)")
    p.add_argument("--predictor-hidden", type=POSITIVE, default=256,
                   help="block-predictor hidden width (default 256; paper: 1024)")
    p.add_argument("--predictor-tokens", type=POSITIVE, default=16384, help="tokens per block to train/score on")
    p.add_argument("--predictor-epochs", type=POSITIVE, default=60, help="block-predictor training epochs")
    p.add_argument("--no-block-gain", action="store_true",
                   help="rank by local output error only (skip the forwards that calibrate it to the output KL)")
    p.add_argument("--gain-samples", type=POSITIVE, default=32, help="calibration sequences the block gains use")


def add_parsers(sub, add_common) -> None:
    from ..flags import LENGTH, POSITIVE, float_range

    pr = sub.add_parser("profile", help="expert usage, outlier and block-importance scores, sensitivities, plots")
    _add_calib_flags(pr)
    pr.add_argument("--out", required=True, help="output folder (profile.json, predictors.safetensors, *.png)")
    pr.add_argument("--no-sensitivity", action="store_true", help="skip the per-width losses (no --avg-bits later)")
    pr.add_argument("--no-predictor", action="store_true", help="skip the block-importance predictors")
    add_common(pr)

    pl = sub.add_parser("plan", help="build a mixed-precision bit plan (rules or a bit-budget search)",
                        description="Rules compose: role widths first, then each selection rule raises what it "
                                    "selects to at least its width. K@B means count K at B bits (B defaults to "
                                    "--high-bits).")
    _add_calib_flags(pl)
    pl.add_argument("--out", required=True, help="plan file: .yaml, .yml or .json")
    pl.add_argument("--profile", default=None, help="profile folder from `moeq profile` (skips the calibration pass)")
    pl.add_argument("--bits", type=int, default=2,
                    help="base width of the plan: routed experts, and every role without its own --*-bits (default 2;"
                         " not quantize's --bits, the width of every linear, default 4)")
    pl.add_argument("--attn-bits", type=int, default=None, help="attention width (default: --bits)")
    pl.add_argument("--shared-bits", type=int, default=None, help="shared-expert width (default: --bits)")
    pl.add_argument("--dense-bits", type=int, default=None, help="dense-MLP width of non-MoE blocks (default: attn)")
    pl.add_argument("--high-bits", type=int, default=4, help="width of selection rules given without @B (default 4)")
    pl.add_argument("--freq-top", default=None, metavar="K[@B]", help="top-K most routed experts per layer")
    pl.add_argument("--alpha", type=float, default=0.0, help="share of --freq-top given to outlier-ranked linears")
    pl.add_argument("--first-k", default=None, metavar="K[@B]", help="all experts of the first K MoE blocks")
    pl.add_argument("--last-k", default=None, metavar="K[@B]", help="all experts of the last K MoE blocks")
    pl.add_argument("--outlier-top", default=None, metavar="P[@B]", help="top P%% of expert linears by outlier score")
    pl.add_argument("--importance-top", default=None, metavar="K[@B]", help="top-K blocks by the importance predictor")
    pl.add_argument("--random-seed", type=int, default=None, help="random selections of the same counts (baseline)")
    units = pl.add_mutually_exclusive_group()
    units.add_argument("--serving-compatible", dest="serving_compatible", action="store_true", default=True,
                       help="one width per fused unit: a layer's experts, fused q/k/v, gate/up (default)")
    units.add_argument("--mix-units", dest="serving_compatible", action="store_false",
                       help="let widths differ inside a fused unit (per-expert plans, for in-memory studies): a "
                            "compressed-tensors export stores each such unit at its widest member's width")
    from ..export.engines import ENGINES

    pl.add_argument("--engine", choices=tuple(ENGINES), default=None,
                    help="only widths this serving engine loads (e.g. vllm: experts 2/4/8 bits; sglang: 4/8), one per "
                         "fused unit; `moeq check-serving` checks the export")
    pl.add_argument("--avg-bits", type=float_range(0), default=None,
                    help="search the least-sensitive plan within this budget, at least the lowest --candidates width")
    pl.add_argument("--search", choices=SEARCHES, default="knapsack", help="budgeted search algorithm")
    pl.add_argument("--measure", action="store_true", help="quantize with the plan (and uniform floor(--avg-bits)) "
                                                           "and report measured error and perplexity")
    pl.add_argument("--ppl", default="wikitext2", help="perplexity sets for --measure (comma-separated)")
    pl.add_argument("--ppl-limit", type=POSITIVE, default=None, help="--measure: first N windows of each set")
    pl.add_argument("--eval-seqlen", type=LENGTH, default=None,
                    help="--measure: evaluation window, 2..context (default: min(2048, context))")
    add_common(pl)


def quant_config(a) -> QuantConfig:
    """The run configuration the flags describe (uniform plan at the base width), resolved for the model
    by the library (``moeq.methods.resolve_config``) exactly as ``moeq quantize`` does."""
    from ..flags import quant_config as from_flags

    return from_flags(a, BitPlan(default=QuantArgs(getattr(a, "bits", 4), a.group_size or 128, a.sym)))


def plan_rules(a) -> PlanRules:
    sel = {f: Selection.parse(getattr(a, f), a.high_bits, "--" + f.replace("_", "-"))
           for f in ("freq_top", "first_k", "last_k", "outlier_top", "importance_top")}
    return PlanRules(bits=a.bits, attn_bits=a.attn_bits, shared_bits=a.shared_bits, dense_bits=a.dense_bits,
                     group_size=a.group_size, symmetric=a.sym, alpha=a.alpha, random_seed=a.random_seed,
                     serving_compatible=a.serving_compatible, engine=a.engine, **sel)


def cmd_profile(a) -> int:
    from ..utils.fs import atomic_dir, check_output
    from .plots import profile_plots
    from .run import load_for_profile, run_profile

    check_grid_family(a)
    check_output(a.out, a.overwrite, "profile.json")
    a.group_size = 128 if a.group_size is None else a.group_size
    check_model(a)
    loaded, cfg, device = load_for_profile(a, quant_config(a))
    with atomic_dir(a.out, a.overwrite, "profile.json") as tmp:
        prof = run_profile(loaded, cfg, a, device, predictor=not a.no_predictor, sensitivity=not a.no_sensitivity,
                           predictors_out=tmp / "predictors.safetensors")
        prof.save(tmp)
        files = profile_plots(prof, tmp)
    print(f"profiled {prof.model} ({prof.model_type}) on {prof.tokens:,} calibration tokens "
          f"in {prof.seconds['total']:.1f}s; expert-balance std {prof.balance_std:.4f}")
    if prof.importance:
        ranked = sorted(prof.importance, key=lambda b: -prof.importance[b]["score"])
        print("blocks by predicted importance: " + ", ".join(
            f"{b} ({prof.importance[b]['score']:.4f})" for b in ranked))
    print(f"wrote profile.json, {'predictors.safetensors, ' if prof.importance else ''}{', '.join(files)} -> {a.out}")
    return 0


def check_grid_family(a) -> None:
    """The search and the rules choose widths on plain grids; K-quant grids are a ``moeq quantize`` choice."""
    if getattr(a, "kquant_scales", False):
        raise ValueError("moeq profile / plan choose widths on plain grids; --kquant-scales belongs to `moeq "
                         "quantize` (uniform), or to a plan file's rules (superblock: true, with their group size)")


def check_model(a) -> None:
    """MODEL resolves to a supported checkpoint whose context holds the windows asked for (no weight read)."""
    from ..models.loading import open_checkpoint
    from ..preflight import check_lengths

    info = open_checkpoint(a.model, a.trust_remote_code, a.allow_pickle)
    check_lengths(info.config, {"--seqlen": a.seqlen, "--eval-seqlen": getattr(a, "eval_seqlen", None)})


def check_budget(a, prof) -> None:
    """--avg-bits is reachable with the widths the search may use (the profile's, or --candidates)."""
    if prof is not None and not (prof.candidates and any(prof.sensitivity.values())):
        raise ValueError(f"--profile {a.profile}: the profile has no sensitivities; rerun `moeq profile` without "
                         "--no-sensitivity, or plan with rules instead of --avg-bits")
    widths = prof.candidates if prof is not None else a.candidates
    if a.avg_bits < min(widths):
        raise ValueError(f"--avg-bits {a.avg_bits:g} is below the lowest candidate width {min(widths)}; raise it "
                         f"to at least {min(widths)}")


def cmd_plan(a) -> int:
    from .profile import Profile
    from .run import check_plan_out, make_plan

    check_grid_family(a)
    check_plan_out(a)
    prof = Profile.load(a.profile) if a.profile else None
    if a.group_size is None:
        a.group_size = prof.group_size if prof is not None else 128
    if a.avg_bits is not None:
        check_budget(a, prof)
    if prof is None or a.measure:
        check_model(a)
    if a.avg_bits is not None and any(getattr(a, f) is not None for f in (
            "attn_bits", "shared_bits", "dense_bits", "freq_top", "first_k", "last_k", "outlier_top",
            "importance_top", "random_seed")):
        raise ValueError("--avg-bits searches every width itself: drop the rule flags (--attn-bits, --freq-top, ...) "
                         "or drop --avg-bits")
    rules = None if a.avg_bits is not None else plan_rules(a)
    out = make_plan(a, rules, quant_config(a))
    print(json.dumps(out["printed"], indent=1) if a.verbose else out["text"])
    return 0
