"""QuantMoE-Bench on the bundled models: the structure-aware mixed-precision ladder, the research questions
against random baselines, and the bit-budget search, with a perplexity-vs-bits Pareto plot.

* Table 1 ladder (paper Table 1, low/high = 2/4 bits): uniform 2, 3 (and 4) bits; +Attn (attention at 4);
  +Attn+Shared (shared expert at 4, when the model has one); then on top of that base: +Freq (top-K most
  routed experts per layer), +FirstL (experts of the first K MoE blocks), +LinearOSP (top 25% expert
  linears by outlier score), +LayerISP (experts of the K blocks the importance predictor ranks first), and
  +Freq+FirstL.
* Research questions, each against random selections of the same size (seeds 42, 43, 44; mean ± std):
  frequent vs random experts; attention vs the same number of bits on random expert linears; first-K vs
  last-K vs random blocks; shared expert vs random experts of the same size; outlier scorer vs random
  linears; importance predictor vs random blocks.
* Budget search: knapsack plans at exactly each heuristic's average bits (the like-for-like comparison),
  and knapsack plans (and serving-compatible ones) at several average-bit budgets, with the profile's
  predicted error (summed sensitivities) next to the measured perplexity.
* Task accuracy (``--tasks``, default piqa and arc_easy, first ``--task-limit`` documents) on the ladder
  and the matched-bits search cells.

Every cell is GPTQ (g128, symmetric, WikiText-2 calibration) on one loaded model (deep copies), evaluated
on WikiText-2 and C4 perplexity. Identical plans are quantized once. Results go to
benchmarks/results/mixed_precision_<model>.json (rewritten after every cell; ``--resume`` skips finished
cells), a markdown rendering (.md, also printed), the Pareto plot (_pareto.png) and the profile with its
figures (mixed_precision_<model>_profile/).

Full run (the lead, on the final bundled models; hours on a CPU):

    python benchmarks/mixed_precision.py --model qwen2-moe-tiny
    python benchmarks/mixed_precision.py --model mixtral-tiny

Quick check that it runs end to end (minutes; numbers meaningless):

    python benchmarks/mixed_precision.py --model qwen2-moe-tiny --nsamples 8 --seqlen 256 --eval-limit 4 --tag quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("MOEQ_QUIET", "1")

from moeq.allocate.plan import PlanRules, Selection, build_plan, plan_stats  # noqa: E402
from moeq.allocate.plots import pareto_plot, profile_plots  # noqa: E402
from moeq.allocate.predictor import PredictorConfig  # noqa: E402
from moeq.allocate.profile import ProfileOptions, profile_model  # noqa: E402
from moeq.allocate.search import predicted_error, search  # noqa: E402
from moeq.config import BitPlan, CalibSpec, QuantConfig  # noqa: E402
from moeq.evaluate.perplexity import default_seqlen, evaluate_ppl  # noqa: E402
from moeq.models.adapter import ModelAdapter  # noqa: E402
from moeq.models.loading import load_model  # noqa: E402
from moeq.pipeline import make_calibration, quantize_loaded  # noqa: E402
from moeq.quant.primitives import QuantArgs  # noqa: E402
from moeq.utils.device import fits_on_device, resolve_device  # noqa: E402

SETS = ("wikitext2", "c4")


class Bench:
    """One loaded model, its profile, and a cache of quantized cells keyed by the plan itself."""

    def __init__(self, a):
        self.a = a
        self.device = resolve_device(a.device)
        self.loaded = load_model(a.model, device=self.device)
        if fits_on_device(self.loaded.model, self.device):
            self.loaded.model.to(self.device)
        self.seqlen = default_seqlen(self.loaded.model, a.seqlen)
        self.cfg = QuantConfig(method=a.method, calib=CalibSpec("wikitext2", a.nsamples, self.seqlen, 0),
                               batch_size=a.batch_size)
        name = f"mixed_precision_{a.model}{'_' + a.tag if a.tag else ''}"
        self.path = Path(a.out) / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(self.path.read_text()) if a.resume and self.path.exists() else {}
        self.cache: dict[str, dict] = old.get("cells", {})
        self.windows: dict = {}
        calib = make_calibration(self.loaded.model, self.loaded.tokenizer, self.loaded.path, self.cfg, None,
                                 self.device)
        opts = ProfileOptions(template=QuantArgs(4, a.group_size, True), batch_size=a.batch_size,
                              predictor_cfg=PredictorConfig(max_tokens=a.predictor_tokens),
                              block_gain=not a.no_block_gain)
        self.profile_dir = Path(a.out) / f"{name}_profile"
        self.profile_dir.mkdir(exist_ok=True)
        self.prof = profile_model(ModelAdapter.for_model(self.loaded.model), calib.ids, opts, self.cfg,
                                  self.loaded.storage_dtype, self.device, model_name=a.model,
                                  calib_info=calib.describe(),
                                  predictors_out=self.profile_dir / "predictors.safetensors")
        self.prof.save(self.profile_dir)
        profile_plots(self.prof, self.profile_dir)
        self.fp = old.get("fp") or self._ppl(self.loaded.model, "FP")
        if a.tasks and "tasks" not in self.fp:
            self.fp["tasks"] = self._tasks(self.loaded.model)
        self.out = {"model": a.model, "args": vars(a), "fp": self.fp, "profile": str(self.profile_dir),
                    "balance_std": self.prof.balance_std, "block_gain": self.prof.to_dict()["block_gain"], "cells": self.cache,
                    "ladder": [], "questions": [],
                    "search": []}

    def _ppl(self, model, label):
        r = evaluate_ppl(model, self.loaded.tokenizer, SETS, self.seqlen, None, self.windows, label, self.a.eval_limit)
        return {k: v["ppl"] for k, v in r.items()}

    def cell(self, label: str, plan: BitPlan, tasks: bool = False) -> dict:
        """Quantize with ``plan`` (once per distinct plan) and measure perplexity (and, with ``tasks``, the
        --tasks accuracies)."""
        mods = self.prof.modules
        bits = {r.name: plan.args_for(r.name).num_bits for r in mods}
        key = hashlib.sha1(json.dumps(sorted((n, str(plan.args_for(n))) for n in bits)).encode()).hexdigest()[:16]
        want_tasks = tasks and bool(self.a.tasks) and "tasks" not in self.cache.get(key, {})
        if key not in self.cache or want_tasks:
            q = quantize_loaded(self.loaded, replace(self.cfg, plan=plan), None, self.device)
            st = plan_stats(plan, mods)
            r = self.cache.get(key) or {
                "avg_bits": st["avg_bits"], "avg_bits_with_overhead": st["avg_bits_with_overhead"],
                "serving_compatible": st["serving_compatible"], "expert_schemes": st["expert_schemes"],
                **self._ppl(q.model, label)}
            if want_tasks:
                r["tasks"] = self._tasks(q.model)
            self.cache[key] = r
            r["predicted_error"] = predicted_error(self.prof, bits)
            self.save()
            acc = "".join(f"  {t} {v:.3f}" for t, v in r.get("tasks", {}).items())
            print(f"{label:<40} {r['avg_bits']:.3f} bits  wiki2 {r['wikitext2']:.3f}  c4 {r['c4']:.3f}{acc}",
                  flush=True)
        else:  # a resumed cell: the prediction of this run's profile
            self.cache[key]["predicted_error"] = predicted_error(self.prof, bits)
        return {"label": label, "cell": key, **self.cache[key]}

    def _tasks(self, model) -> dict[str, float]:
        """Accuracy (acc_norm where the task has it, else acc) on each --tasks task, first --task-limit docs."""
        from moeq.evaluate.lm_eval import run_tasks

        res = run_tasks(model, self.loaded.tokenizer, self.a.tasks, self.a.task_limit)
        return {t: m.get("acc_norm", m.get("acc")) for t, m in res.items()}

    def rules(self, label: str, tasks: bool = False, **kw) -> dict:
        return self.cell(label, build_plan(self.prof, PlanRules(group_size=self.a.group_size, **kw)), tasks)

    def uniform(self, bits: int) -> dict:
        return self.cell(f"uniform {bits}-bit", BitPlan(default=QuantArgs(bits, self.a.group_size, True)), True)

    def save(self):
        self.path.write_text(json.dumps(getattr(self, "out", {"cells": self.cache}), indent=2) + "\n")


def run(b: Bench) -> dict:
    a, prof, out = b.a, b.prof, b.out
    lo, hi = a.low_bits, a.high_bits
    mods = prof.modules
    has_shared = any(r.role == "shared" for r in mods)
    n_blocks = len(prof.moe_blocks)
    K = a.freq_k or max(1, prof.num_experts // 4)
    k_blk = a.block_k or max(1, n_blocks // 4)
    sel = lambda n: Selection(n, hi)  # noqa: E731
    base = {"bits": lo, "attn_bits": hi, "shared_bits": hi if has_shared else None}
    base_name = "+Attn+Shared" if has_shared else "+Attn"
    out["settings"] = {"low_bits": lo, "high_bits": hi, "freq_k": K, "block_k": k_blk, "outlier_pct": a.outlier_pct,
                       "seeds": a.seeds, "shared_expert": has_shared}

    ladder = [b.uniform(lo), b.uniform(3), b.uniform(4), b.rules("+Attn", True, bits=lo, attn_bits=hi)]
    if has_shared:
        ladder.append(b.rules("+Attn+Shared", True, **base))
    ladder += [b.rules(f"{base_name}+Freq (top-{K})", True, **base, freq_top=sel(K)),
               b.rules(f"{base_name}+FirstL ({k_blk})", True, **base, first_k=sel(k_blk)),
               b.rules(f"{base_name}+LinearOSP ({a.outlier_pct:g}%)", True, **base, outlier_top=sel(a.outlier_pct)),
               b.rules(f"{base_name}+LayerISP ({k_blk})", True, **base, importance_top=sel(k_blk)),
               b.rules(f"{base_name}+Freq+FirstL", True, **base, freq_top=sel(K), first_k=sel(k_blk))]
    out["ladder"] = ladder

    # the budget search at exactly each heuristic's average bits: the like-for-like comparison
    out["matched"] = []
    for h in ladder:
        if h["label"].startswith("uniform"):
            continue
        res = search(prof, h["avg_bits"], "knapsack", False)
        row = b.cell(f"search @ {h['label']}", res.plan, True)
        row.update(budget=h["avg_bits"], heuristic=h["label"], exact=res.exact)
        out["matched"].append(row)
    b.save()

    def question(name, structured: list[dict], rand_kw: dict, base_kw: dict):
        rand = [b.rules(f"{name}: random seed {s}", **base_kw, **rand_kw, random_seed=s) for s in a.seeds]
        out["questions"].append({"question": name, "structured": structured, "random": rand})
        b.save()

    question("frequent vs random experts", [b.rules(f"{base_name}+Freq (top-{K})", **base, freq_top=sel(K))],
             {"freq_top": sel(K)}, base)
    expert_linear = next(r.params for r in mods if r.role == "expert")
    experts_n = sum(r.role == "expert" for r in mods)
    attn_as_linears = round(sum(r.params for r in mods if r.role == "attn") / expert_linear)
    question("attention vs FFN bits", [b.rules("+Attn", bits=lo, attn_bits=hi)],
             {"outlier_top": sel(100 * attn_as_linears / experts_n)}, {"bits": lo})
    question("first-K vs last-K blocks", [b.rules(f"+FirstL ({k_blk})", **base, first_k=sel(k_blk)),
                                          b.rules(f"+LastL ({k_blk})", **base, last_k=sel(k_blk))],
             {"first_k": sel(k_blk)}, base)
    if has_shared:
        shared_params = sum(r.params for r in mods if r.role == "shared") / n_blocks
        k_s = max(1, round(shared_params / (3 * expert_linear)))
        question(f"shared vs random experts ({k_s} per layer)", [b.rules("+Attn+Shared", **base)],
                 {"freq_top": sel(k_s)}, {"bits": lo, "attn_bits": hi})
    question("outlier scorer vs random linears",
             [b.rules(f"{base_name}+LinearOSP ({a.outlier_pct:g}%)", **base, outlier_top=sel(a.outlier_pct))],
             {"outlier_top": sel(a.outlier_pct)}, base)
    question("importance predictor vs random blocks",
             [b.rules(f"{base_name}+LayerISP ({k_blk})", **base, importance_top=sel(k_blk))],
             {"importance_top": sel(k_blk)}, base)

    for budget in a.budgets:
        for serving in (False, True):
            res = search(prof, budget, "knapsack", serving)
            row = b.cell(f"search {budget:g}{' serving' if serving else ''}", res.plan)
            row.update(budget=budget, serving=serving, exact=res.exact)
            out["search"].append(row)
    b.save()
    return out


def _fmt(vals):
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def render(out: dict) -> str:
    fp = out["fp"]
    lines = [f"# Mixed precision on {out['model']}", "",
             f"FP: WikiText-2 {fp['wikitext2']:.3f}, C4 {fp['c4']:.3f}; calibration expert-balance std "
             f"{out['balance_std']:.4f}; settings {json.dumps(out.get('settings', {}))}", "",
             "## Ladder (paper Table 1)", ""]
    tasks = list(fp.get("tasks", {}))
    tl = out["args"].get("task_limit")
    if tasks:
        lines += [f"Task accuracy: acc_norm where the task has it, else acc; first {tl} documents of each task.", ""]
    tcols = "".join(f" {t} |" for t in tasks)
    lines += [f"| config | avg bits | with scales | WikiText-2 | C4 |{tcols} serving-compatible |",
              "|---|---|---|---|---|" + "---|" * len(tasks) + "---|"]
    accs = lambda r: "".join(f" {r.get('tasks', {}).get(t, float('nan')):.3f} |" for t in tasks)  # noqa: E731
    lines.append(f"| FP16 | 16 | 16 | {fp['wikitext2']:.3f} | {fp['c4']:.3f} |{accs(fp)} yes |")
    for r in out["ladder"]:
        lines.append(f"| {r['label']} | {r['avg_bits']:.3f} | {r['avg_bits_with_overhead']:.3f} | {r['wikitext2']:.3f} "
                     f"| {r['c4']:.3f} |{accs(r)} {'yes' if r['serving_compatible'] else 'no'} |")
    if out.get("matched"):
        lines += ["", "## Budget search at each heuristic's average bits", "",
                  f"| heuristic | avg bits | WikiText-2 | C4 |{tcols} search avg bits | search WikiText-2 | "
                  f"search C4 |{tcols}",
                  "|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|" + "---|" * len(tasks)]
        by = {r["label"]: r for r in out["ladder"]}
        for m in out["matched"]:
            h = by[m["heuristic"]]
            lines.append(f"| {h['label']} | {h['avg_bits']:.3f} | {h['wikitext2']:.3f} | {h['c4']:.3f} |{accs(h)} "
                         f"{m['avg_bits']:.3f} | {m['wikitext2']:.3f} | {m['c4']:.3f} |{accs(m)}")
    seeds = ", ".join(map(str, out["args"]["seeds"]))
    lines += ["", f"## Research questions (random: seeds {seeds}, mean ± std)", "",
              "| question | choice | avg bits | WikiText-2 | C4 |", "|---|---|---|---|---|"]
    for q in out["questions"]:
        for r in q["structured"]:
            lines.append(f"| {q['question']} | {r['label']} | {r['avg_bits']:.3f} | {r['wikitext2']:.3f} | "
                         f"{r['c4']:.3f} |")
        rs = q["random"]
        lines.append(f"| {q['question']} | random ({len(rs)} seeds) | {_fmt([r['avg_bits'] for r in rs])} | "
                     f"{_fmt([r['wikitext2'] for r in rs])} | {_fmt([r['c4'] for r in rs])} |")
    lines += ["", "## Budget search (knapsack on the profiled sensitivities)", "",
              "| budget | serving-compatible | avg bits | predicted error | WikiText-2 | C4 |",
              "|---|---|---|---|---|---|"]
    for r in out["search"]:
        lines.append(f"| {r['budget']:g} | {'yes' if r['serving'] else 'no'} | {r['avg_bits']:.3f} | "
                     f"{r['predicted_error']:.4g} | {r['wikitext2']:.3f} | {r['c4']:.3f} |")
    gains = out.get("block_gain") or {}
    if gains:
        parts = list(dict.fromkeys(k.rpartition(":")[0] for k in gains))
        widths = sorted({int(k.rpartition(":")[2]) for k in gains})
        lines += ["", "Block gains: measured KL to FP (nats/token) with only that part at RTN w bits, and the gain "
                  "(KL per unit of local error) the search multiplies sensitivities by", "",
                  "| block:part |" + "".join(f" w={w} KL (gain) |" for w in widths), "|---|" + "---|" * len(widths)]
        for p in parts:
            lines.append(f"| {p} |" + "".join(f" {gains[f'{p}:{w}']['kl']:.2e} ({gains[f'{p}:{w}']['gain']:.3g}) |"
                                              for w in widths))
    else:
        lines += ["", "Search on local errors only (no block gains)."]
    uni = {r["avg_bits"]: r for r in out["ladder"] if r["label"].startswith("uniform")}
    lines += ["", "Predicted error of the uniform plans: " + ", ".join(
        f"{b:g} bits {r['predicted_error']:.4g}" for b, r in sorted(uni.items()))]
    lines += ["", f"![perplexity vs bits]({Path(out.get('pareto', '')).name})", ""]
    return "\n".join(lines)


def pareto(out: dict, path: Path) -> None:
    uni = [r for r in out["ladder"] if r["label"].startswith("uniform")]
    heur = [r for r in out["ladder"] if not r["label"].startswith("uniform")]
    series = {"uniform": [(r["avg_bits"], r["wikitext2"], r["label"].split()[1]) for r in uni],
              "heuristics": [(r["avg_bits"], r["wikitext2"], r["label"].split(" (")[0].replace("+Attn+Shared", "AS"))
                             for r in heur],
              "knapsack": [(r["avg_bits"], r["wikitext2"], "") for r in out["search"] + out.get("matched", [])
                           if not r.get("serving")],
              "knapsack, serving-compatible": [(r["avg_bits"], r["wikitext2"], "") for r in out["search"]
                                               if r["serving"]]}
    pareto_plot(series, path, "WikiText-2 perplexity", f"{out['model']}: perplexity vs average bits")
    out["pareto"] = str(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2-moe-tiny")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=None, help="first N evaluation windows (quick checks only)")
    ap.add_argument("--low-bits", type=int, default=2)
    ap.add_argument("--high-bits", type=int, default=4)
    ap.add_argument("--freq-k", type=int, default=None, help="experts per layer for +Freq (default E/4)")
    ap.add_argument("--block-k", type=int, default=None, help="blocks for +FirstL/+LayerISP (default MoE blocks/4)")
    ap.add_argument("--outlier-pct", type=float, default=25.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.25, 2.5, 3.0, 3.5])
    ap.add_argument("--predictor-tokens", type=int, default=16384)
    ap.add_argument("--no-block-gain", action="store_true", help="search on local errors only (the ablation)")
    ap.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=["piqa", "arc_easy"],
                    help="comma-separated offline tasks scored on the ladder and matched-search cells ('' = none)")
    ap.add_argument("--task-limit", type=int, default=200, help="first N documents of each task")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N]")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="", help="suffix for the result files (e.g. quick)")
    ap.add_argument("--resume", action="store_true", help="reuse finished cells of an earlier run with the same tag")
    ap.add_argument("--render-only", action="store_true", help="redraw the markdown and plot from the saved JSON")
    a = ap.parse_args()
    stem = Path(a.out) / f"mixed_precision_{a.model}{'_' + a.tag if a.tag else ''}"
    if a.render_only:
        out = json.loads(Path(f"{stem}.json").read_text())
    else:
        b = Bench(a)
        out = run(b)
    pareto(out, Path(f"{stem}_pareto.png"))
    Path(f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    md = render(out)
    Path(f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
