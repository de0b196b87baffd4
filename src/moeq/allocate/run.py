"""What ``moeq profile`` / ``moeq plan`` run: load, calibrate, profile, plan or search, measure, save.

Stage functions only; the algorithms live in :mod:`.profile`, :mod:`.plan`, :mod:`.search`. The
``--measure`` step quantizes deep copies of the loaded model with the plan (and with the uniform
plan at floor(budget) bits) exactly as ``moeq quantize`` would, and reports next to the profile's
predicted error (the summed sensitivities) the measured average bits and perplexity.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from ..config import BitPlan
from ..models.adapter import ModelAdapter
from ..models.bundled import DEFAULT_MODEL
from ..quant.primitives import QuantArgs
from .plan import build_plan, plan_stats
from .planfile import plan_format, save_plan
from .predictor import PredictorConfig
from .profile import Profile, ProfileOptions, profile_model
from .search import predicted_error, search


def load_for_profile(a, cfg):
    from ..models.loading import load_model
    from ..utils.device import fits_on_device, resolve_device

    from ..methods import resolve_config

    device = resolve_device(a.device)
    loaded = load_model(a.model, device=device, trust_remote_code=a.trust_remote_code,
                        allow_pickle=getattr(a, "allow_pickle", False))
    if fits_on_device(loaded.model, device):
        loaded.model.to(device)
    cfg, _ = resolve_config(cfg, is_moe=ModelAdapter.for_model(loaded.model).spec.moe is not None)
    return loaded, cfg, device


def run_profile(loaded, cfg, a, device, predictor: bool, sensitivity: bool, predictors_out=None) -> Profile:
    from ..pipeline import make_calibration

    calib = make_calibration(loaded.model, loaded.tokenizer, loaded.path, cfg, a.data_dir, device)
    template = QuantArgs(4, a.group_size, a.sym, full_range=getattr(a, "full_range", False))
    opts = ProfileOptions(candidates=tuple(sorted(set(a.candidates))), template=template,
                          sensitivity=sensitivity, predictor=predictor, batch_size=a.batch_size,
                          block_gain=not a.no_block_gain, gain_samples=a.gain_samples,
                          predictor_cfg=PredictorConfig(hidden=a.predictor_hidden, max_tokens=a.predictor_tokens,
                                                        epochs=a.predictor_epochs))
    return profile_model(ModelAdapter.for_model(loaded.model), calib.ids, opts, cfg, loaded.storage_dtype, device,
                         model_name=a.model or DEFAULT_MODEL, calib_info=calib.describe(),
                         predictors_out=predictors_out)


def measure(a, loaded, prof: Profile, plans: dict[str, BitPlan], cfg, device) -> dict:
    """Quantize with each plan; -> {label: {avg_bits, predicted_error, <ppl per set>}} plus the FP perplexity."""
    from ..evaluate.perplexity import evaluate_ppl
    from ..evaluate.report import bit_stats
    from ..pipeline import quantize_loaded

    sets = tuple(s for s in a.ppl.split(",") if s.strip())
    windows: dict = {}
    out = {"fp": {k: v["ppl"] for k, v in evaluate_ppl(loaded.model, loaded.tokenizer, sets, a.eval_seqlen,
                                                       a.data_dir, windows, "FP", a.ppl_limit).items()}}
    for label, plan in plans.items():
        q = quantize_loaded(loaded, replace(cfg, plan=plan), a.data_dir, device)
        bits = {r.name: plan.args_for(r.name).num_bits for r in prof.modules if plan.args_for(r.name) is not None}
        try:
            predicted = predicted_error(prof, bits)
        except ValueError:
            predicted = None
        ppl = evaluate_ppl(q.model, loaded.tokenizer, sets, a.eval_seqlen, a.data_dir, windows, label, a.ppl_limit)
        out[label] = {"avg_bits": bit_stats(list(q.loop.rows.values()))["avg_bits"], "predicted_error": predicted,
                      **{k: v["ppl"] for k, v in ppl.items()}}
    return out


def _summary_text(path, stats: dict, prov: dict, measured: dict | None) -> str:
    lines = [f"plan -> {path}: avg {stats['avg_bits']:.4f} bits ({stats['avg_bits_with_overhead']:.4f} with scales), "
             f"{stats['quantized_params']:,} quantized params"]
    tot = max(1, stats["quantized_params"])
    lines.append("  params by width: " + ", ".join(f"{b}-bit {n / tot:.1%}"
                                                   for b, n in stats["params_by_bits"].items()))
    lines.append("  avg bits by role: " + ", ".join(f"{r} {v:.2f}" for r, v in stats["avg_bits_by_role"].items()))
    if stats["serving_compatible"]:
        lines.append("  serving: every fused unit has one scheme (fused-MoE / fused-QKV kernels can run it)")
    else:
        v = stats["serving_violations"]
        lines.append(f"  WARNING: {len(v)} serving units mix schemes (--mix-units), which loaders and fused-MoE / "
                     f"fused-QKV kernels read with one scheme; e.g. {v[0]}. A compressed-tensors export stores each "
                     "such unit at its widest member's width (same weights, the bytes of the wider width)")
    if stats["expert_schemes"] > 1:
        lines.append(f"  note: routed experts use {stats['expert_schemes']} schemes; transformers reads all routed "
                     "experts of a fused-expert model with one scheme, so a compressed-tensors export stores them "
                     "all at the widest (GGUF keeps one type per layer's expert tensor)")
    if "search" in prov:
        s = prov["search"]
        uni = ", ".join(f"{b}-bit {v:.4g}" for b, v in prov["uniform_predicted_error"].items())
        lines.append(f"  {s['method']} search{' (exact)' if prov['exact'] else ''} under {s['budget']} bits: "
                     f"predicted error {prov['predicted_error']:.4g} (uniform: {uni})")
    if measured:
        fp = ", ".join(f"{k} {v:.3f}" for k, v in measured["fp"].items())
        lines.append(f"  measured (FP ppl {fp}):")
        for label, m in measured.items():
            if label == "fp":
                continue
            ppl = ", ".join(f"{k} {m[k]:.3f}" for k in measured["fp"])
            pred = f"{m['predicted_error']:.4g}" if m["predicted_error"] is not None else "-"
            lines.append(f"    {label:<16} avg bits {m['avg_bits']:.4f}  predicted error {pred}  ppl {ppl}")
    return "\n".join(lines)


def check_plan_out(a) -> Path:
    """--out is a plan file (.yaml/.yml/.json) that can be written; an existing one needs --overwrite."""
    from ..preflight import output_file

    out_path = output_file(a.out, "--out", a.overwrite)
    plan_format(out_path)
    return out_path


def make_plan(a, rules, cfg) -> dict:
    """Build, summarise (and optionally measure) and save the plan ``a`` asks for."""
    out_path = check_plan_out(a)
    loaded = device = None
    if a.profile:
        prof = Profile.load(a.profile)
    else:
        loaded, cfg, device = load_for_profile(a, cfg)
        need_pred = rules is not None and rules.importance_top is not None and rules.random_seed is None
        prof = run_profile(loaded, cfg, a, device, predictor=need_pred, sensitivity=a.avg_bits is not None)
    prov: dict = {"profile": str(a.profile) if a.profile else None, "calibration": prof.calibration}
    if rules is None:
        res = search(prof, a.avg_bits, a.search, a.serving_compatible, engine=a.engine)
        plan = res.plan
        prov.update(search=res.info, exact=res.exact, predicted_error=res.predicted,
                    uniform_predicted_error={str(b): predicted_error(prof, {r.name: b for r in prof.modules})
                                             for b in prof.candidates})
    else:
        plan = build_plan(prof, rules)
        prov["rules"] = rules.to_dict()
    full = getattr(a, "full_range", False) or prof.full_range  # a profile measured on full-range grids
    if full:  # every symmetric scheme on all 2^b integers
        plan = plan.full_range()
    stats = plan_stats(plan, prof.modules)
    measured = None
    if a.measure:
        if loaded is None:
            loaded, cfg, device = load_for_profile(a, cfg)
        plans = {"plan": plan}
        if a.avg_bits is not None and math.floor(a.avg_bits) >= 2:
            gs = prof.group_size
            uniform = BitPlan(default=QuantArgs(math.floor(a.avg_bits), gs, prof.symmetric))
            plans[f"uniform {math.floor(a.avg_bits)}-bit"] = uniform.full_range() if full else uniform
        measured = measure(a, loaded, prof, plans, cfg, device)
    meta = {"model": prof.model, "model_type": prof.model_type, "summary": stats, "provenance": prov}
    if measured:
        meta["measured"] = measured
    save_plan(plan, out_path, meta)
    text = _summary_text(out_path, stats, prov, measured)
    return {"plan": plan, "stats": stats, "text": text, "printed": meta}
