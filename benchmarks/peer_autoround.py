"""Intel auto-round (SignRound) against moeq's methods on the bundled models: same calibration ids, same grid.

For every model, bit width and group size, one row per method: auto-round with its default algorithm
(SignRound: 200 iterations of signed-gradient descent on the rounding offsets and min-max clipping, per
decoder block, lr 1/iters, batch 8, quantized inputs of earlier blocks) and the moeq methods of ``--methods``
(default rtn, gptq, and gptaq, blocktune, moequant++ when moeq's method registry has them at run time;
unknown names are skipped with a note). Everybody gets:

* the same calibration token ids: ``--calib-windows`` random ``--seqlen``-token windows of the WikiText-2
  train split drawn with each seed of ``--seeds`` (moeq's ``calibration_windows``); moeq reads them from a
  token-id jsonl, auto-round gets them as its ``dataset`` (one dict of ``input_ids`` per window).
  ``--method-calib own`` lets moeq methods use their registry calibration instead (EBSS for moequant++);
* the same grid: symmetric integers (auto-round's default ``W<b>A16`` schemes are symmetric; moeq runs
  ``QuantArgs(bits, group, symmetric=True)``), groups of ``--group-sizes`` input columns;
* full-precision routers, shared-expert gates and lm_head (moeq's defaults; auto-round gets them as
  ``layer_config`` entries of 16 bits, and auto-round quantizing one is an error);
* moeq's evaluation: WikiText-2 and C4 perplexity (first ``--eval-windows`` windows of each), mean
  KL(P_fp || P_quantized) of the next-token distributions and the mean per-layer top-k routing agreement
  with the FP model on the first ``--fidelity-windows`` WikiText-2 test windows (moeq.evaluate.fidelity).

Quantization wall time: moeq's calibration + quantization (``quantize_loaded``), auto-round's
``quantize()`` (calibration forwards + tuning); model loading, export and evaluation are excluded for both.
Every calibrated row runs each seed of ``--seeds`` (mean ± std; data-free methods such as rtn run once);
auto-round runs the seeds of ``--autoround-seeds`` (default: the same seeds; its tuning seed is the
calibration seed; ``--autoround-seeds 0`` saves about 2 x 6 runs of ~4 min per model).

auto-round runs in its own venv (``--peer-venv``, created on first use if missing) with exactly these pins:
auto-round 0.16.1 (the newest on PyPI when written), torch 2.13.0 (the CPU wheel) and moeq's transformers
5.24.0. The driver writes a job and the calibration ids, runs benchmarks/peer_autoround_worker.py with that
venv's python, and loads back the dequantized weights ((q - zp) * scale in float32, rebuilt from auto-round's
integers and fp16 scales) into a copy of moeq's FP model. auto-round 0.16 unfuses transformers 5's fused 3-D
experts into per-expert nn.Linear before tuning; both the worker and the driver check that every attention,
expert and shared-expert linear came back on a ``bits``-bit grid (at most 2^bits distinct values per group,
changed from FP, cosine to FP >= 0.5) and stop otherwise. On CPU auto-round tunes in bf16 autocast (its
default there; the bundled checkpoints are stored in bf16). torch.compile is off unless
``--autoround-compile``: on this 2-core CPU it cost ~35 s of compilation per run and no tuning speed.

Setup of the peer venv (what the driver does when it is missing):

    python -m venv ~/.cache/moeq/peer/autoround-0.16.1
    ~/.cache/moeq/peer/autoround-0.16.1/bin/pip install torch==2.13.0
    ~/.cache/moeq/peer/autoround-0.16.1/bin/pip install auto-round==0.16.1 transformers==5.24.0

Full run (results in benchmarks/results/peer_autoround.json, a markdown table is printed and written next to
it as .md, both rewritten after every cell; ``--resume`` keeps the finished cells of an interrupted run). On
this 2-core CPU (one thread, the other core busy) the two bundled models with rtn, gptq, blocktune, moequant++
and auto-round take about 8 h with ``--eval-windows 128`` and about 12 h scoring every window; per W/g cell
and seed, qwen2-moe-tiny at 128 x 512 calibration tokens: gptq ~35 s, moequant++ ~40 s, blocktune ~300 s,
auto-round ~270 s (~15 s + 1.26 s per SignRound iteration); evaluation ~55 s per row with 128 windows,
~150 s with all (697 WikiText-2 + 256 C4):

    python benchmarks/peer_autoround.py --eval-windows 128 --resume

Smoke check (qwen2-moe-tiny, W4 g128, seed 0, 8 calibration windows of 128 tokens, 5 SignRound iterations,
4 evaluation windows; writes peer_autoround_smoke.json; numbers meaningless):

    python benchmarks/peer_autoround.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("MOEQ_QUIET", "1")

from moeq.calib.windows import calibration_windows  # noqa: E402
from moeq.config import BitPlan, CalibSpec, QuantConfig  # noqa: E402
from moeq.evaluate.fidelity import compare  # noqa: E402
from moeq.evaluate.perplexity import default_seqlen, evaluate_ppl  # noqa: E402
from moeq.methods import get_method  # noqa: E402
from moeq.models.adapter import ModelAdapter  # noqa: E402
from moeq.models.bundled import bundled_names  # noqa: E402
from moeq.models.loading import load_model  # noqa: E402
from moeq.pipeline import quantize_loaded  # noqa: E402
from moeq.quant.primitives import QuantArgs  # noqa: E402

PINS = {"auto-round": "0.16.1", "torch": "2.13.0", "transformers": "5.24.0"}
PEER_VENV = Path.home() / ".cache" / "moeq" / "peer" / f"autoround-{PINS['auto-round']}"
WORKER = Path(__file__).with_name("peer_autoround_worker.py")
OPTIONAL_METHODS = ("gptaq", "blocktune", "moequant++")  # being added to moeq; run when registered
SYMMETRIC = True  # auto-round's default W<b>A16 schemes; moeq runs the same
SMOKE = {"models": "qwen2-moe-tiny", "bits": "4", "group_sizes": "128", "seeds": "0", "calib_windows": 8,
         "seqlen": 128, "autoround_iters": 5, "eval_windows": 4, "fidelity_windows": 4, "suffix": "_smoke"}
AUTOROUND = "auto-round"


# ------------------------------------------------------------------------------------------ peer venv
def ensure_peer_venv(venv: Path) -> Path:
    """The peer venv's python, created with the pinned versions when it is missing or differs."""
    py = venv / "bin" / "python"
    probe = "import auto_round, torch, transformers; print(auto_round.__version__, torch.__version__, " \
            "transformers.__version__)"
    if py.is_file():
        got = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=False).stdout.split()
        if got[:1] == [PINS["auto-round"]] and got[1:2] and got[1].startswith(PINS["torch"]):
            return py
    print(f"setting up the auto-round venv at {venv} (pins {PINS})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={PINS['torch']}"], check=True)  # the CPU wheel, before anything pulls CUDA
    subprocess.run(pip + [f"auto-round=={PINS['auto-round']}", f"transformers=={PINS['transformers']}",
                          f"torch=={PINS['torch']}"], check=True)
    return py


# ------------------------------------------------------------------------------------------ selection
def moeq_methods(requested: list[str]) -> list[str]:
    """The requested moeq methods that the registry knows now (canonical names); the rest skipped with a note."""
    out = []
    for name in requested:
        try:
            canon = get_method(name).name
        except ValueError:
            print(f"note: moeq has no method {name!r} (not registered yet?); skipping its rows", flush=True)
            continue
        if canon not in out:
            out.append(canon)
    return out


def seeds_for(method: str, seeds: list[int], autoround_seeds: list[int]) -> list[int | None]:
    """Seeds a method runs with; None = one data-free run."""
    if method == AUTOROUND:
        return autoround_seeds
    return seeds if get_method(method).calib is not None else [None]


# ------------------------------------------------------------------------------------------ calibration
def calibration(loaded, n: int, seqlen: int, seed: int, work: Path) -> tuple[torch.Tensor, Path, Path]:
    """WikiText-2 train windows (n, seqlen) for one seed, written for moeq (token-id jsonl) and the worker."""
    from safetensors.torch import save_file

    ids = calibration_windows(loaded.tokenizer, "wikitext2", n, seqlen, seed=seed).ids  # (n, seqlen) long
    jsonl = work / f"calib_s{seed}.jsonl"
    jsonl.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ids.tolist()))
    st = work / f"calib_s{seed}.safetensors"
    save_file({"ids": ids.contiguous()}, str(st))
    return ids, jsonl, st


# ------------------------------------------------------------------------------------------ quantizers
def run_moeq(loaded, method: str, bits: int, group: int, calib_source: str | None, seed: int | None, args):
    """(quantized model, wall seconds of calibration + quantization, row extras) of one moeq method."""
    calib = CalibSpec(calib_source, args.calib_windows, args.seqlen, seed or 0)
    grid = QuantArgs(bits, group, SYMMETRIC, full_range=args.full_range)
    cfg = QuantConfig(method=method, plan=BitPlan(default=grid), calib=calib)
    q = quantize_loaded(loaded, cfg)
    used = None if q.calib is None else ("wikitext2 (shared ids)" if calib_source else q.calib.source)
    return q.model, q.seconds["calibration"] + q.seconds["quantize"], {"calib": used, "notes": q.method.notes}


def run_autoround(loaded, py: Path, bits: int, group: int, seed: int, calib_st: Path, work: Path, args):
    """(quantized model, auto-round's quantize() seconds, worker meta) of one auto-round run."""
    from safetensors.torch import load_file

    ad = ModelAdapter.for_model(loaded.model)
    out = Path(tempfile.mkdtemp(prefix=f"ar_w{bits}g{group}s{seed}_", dir=work))
    job = {"model_path": loaded.path, "calib_ids": str(calib_st), "bits": bits, "group_size": group,
           "sym": SYMMETRIC, "iters": args.autoround_iters, "seed": seed, "threads": args.threads,
           "compile": args.autoround_compile, "fp_modules": ad.full_precision_modules(),
           "expected_linears": [li.name for li in ad.linears()], "out": str(out)}
    (out / "job.json").write_text(json.dumps(job, indent=2))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH="")
    with open(out / "worker.log", "w") as log:
        rc = subprocess.run([str(py), str(WORKER), str(out / "job.json")], stdout=log, stderr=subprocess.STDOUT,
                            env=env, check=False).returncode
    if rc != 0:
        tail = (out / "worker.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"auto-round worker failed (exit {rc}); the end of its log:\n{tail}")
    meta = json.loads((out / "meta.json").read_text())
    model = with_weights(loaded.model, load_file(str(out / "weights.safetensors")))
    meta["driver_check"] = check_on_grid(loaded.model, model, job["expected_linears"], bits, group)
    return model, meta["quant_seconds"], meta


def with_weights(fp_model, weights: dict[str, torch.Tensor]):
    """A copy of ``fp_model`` whose linears take the given per-expert-named weights; every name must exist."""
    model = copy.deepcopy(fp_model)
    ad = ModelAdapter.for_model(model)
    with ad.per_expert():
        known = {li.name for li in ad.linears()}
        unknown = sorted(k for k in weights if k.removesuffix(".weight") not in known)
        if unknown:
            raise SystemExit(f"auto-round returned weights moeq does not quantize: {unknown[:5]}")
        for key, w in weights.items():
            lin = ad.module(key.removesuffix(".weight"))
            lin.weight.data.copy_(w.to(lin.weight.dtype))  # (out, in)
    return model


def check_on_grid(fp_model, q_model, names: list[str], bits: int, group: int) -> dict:
    """Every named linear of ``q_model`` holds at most 2^bits values per group, differs from FP and still
    points the FP way (cosine >= 0.5); -> counts per role. Fails loudly otherwise."""
    fp_ad, q_ad = ModelAdapter.for_model(fp_model), ModelAdapter.for_model(q_model)
    wanted, worst_cos, distinct, roles = set(names), 1.0, 0, {}
    with fp_ad.per_expert(), q_ad.per_expert():
        for li in q_ad.linears():
            if li.name not in wanted:
                continue
            w, w0 = q_ad.module(li.name).weight.detach(), fp_ad.module(li.name).weight.detach()  # (out, in)
            s = w.reshape(w.shape[0], -1, group).sort(-1).values  # (out, groups, group)
            n = int((1 + (s[..., 1:] != s[..., :-1]).sum(-1)).max())
            cos = float(torch.nn.functional.cosine_similarity(w.flatten(), w0.flatten(), 0))
            if n > 2 ** bits or torch.equal(w, w0) or cos < 0.5:
                raise SystemExit(f"{li.name} is not a {bits}-bit quantization of its FP weight: {n} distinct "
                                 f"values in a group, cosine to FP {cos:.3f}")
            worst_cos, distinct = min(worst_cos, cos), max(distinct, n)
            roles[li.role] = roles.get(li.role, 0) + 1
    return {"linears_on_grid": roles, "max_distinct_per_group": distinct, "min_cosine_to_fp": worst_cos}


# ------------------------------------------------------------------------------------------ evaluation
def evaluate(fp_model, q_model, tok, windows: dict, args) -> dict:
    """Perplexities (first --eval-windows windows) and fidelity to FP (first --fidelity-windows)."""
    ppl = evaluate_ppl(q_model, tok, ("wikitext2", "c4"), None, None, windows, limit=args.eval_windows)
    seqlen = default_seqlen(q_model)
    ids = windows[("wikitext2", seqlen)].ids[: args.fidelity_windows]  # (n, seqlen)
    fid = compare(fp_model, q_model, ids)
    return {"wikitext2": ppl["wikitext2"]["ppl"], "c4": ppl["c4"]["ppl"], "kl": fid["kl_fp_to_quantized"],
            "topk_agreement": fid["mean_topk_set_agreement"], "top1_agreement": fid["mean_top1_agreement"]}


# ------------------------------------------------------------------------------------------ results
METRICS = ("wikitext2", "c4", "kl", "topk_agreement", "seconds")


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of each (model, bits, group, method) cell, in run order."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["bits"], r["group_size"], r["method"]), []).append(r)
    out = []
    for (model, bits, group, method), rs in cells.items():
        s = {"model": model, "bits": bits, "group_size": group, "method": method,
             "seeds": [r["seed"] for r in rs]}
        for k in METRICS:
            vals = [r[k] for r in rs if r.get(k) is not None]
            s[k] = statistics.fmean(vals) if vals else None
            s[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(s)
    return out


def fmt(mean, std, digits: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def render(result: dict) -> str:
    """The markdown table: FP per model, then every cell as mean ± std over its seeds."""
    a = result["args"]
    grid = ("moeq rows on the full-range grid (--full-range: signed scales, all 2^b integers, auto-round's rule)"
            if a.get("full_range") else "moeq rows on the half-range grid (scale max|w| / (2^(b-1) - 1/2))")
    setting = (f"{'symmetric' if SYMMETRIC else 'asymmetric'} integer weights, groups of {a['group_sizes']}; {grid}; "
               f"calibration {a['calib_windows']} x {a['seqlen']} WikiText-2 train tokens per seed ("
               f"{'the same ids for every method' if a['method_calib'] == 'shared' else 'moeq methods: their own'}"
               f"); auto-round "
               f"{a['autoround_iters']} SignRound iterations; perplexity on the first {a['eval_windows'] or 'all'} "
               f"windows, KL / routing on the first {a['fidelity_windows']} WikiText-2 test windows; "
               f"{result['env']['threads']} thread(s), {result['env']['machine']}.")
    lines = [f"# auto-round {result['env']['peer'].get('auto_round', PINS['auto-round'])} vs moeq", "", setting, "",
             "| model | W | g | method | seeds | WikiText-2 PPL | C4 PPL | KL(FP‖Q) | top-k agree | quant s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, fp in result["fp"].items():
        lines.append(f"| {model} | 16 | - | FP | - | {fp['wikitext2']:.3f} | {fp['c4']:.3f} | 0 | 1 | - |")
        for s in (s for s in result["summary"] if s["model"] == model):
            seeds = ",".join("-" if x is None else str(x) for x in s["seeds"])
            lines.append(f"| {model} | {s['bits']} | {s['group_size']} | {s['method']} | {seeds} | "
                         f"{fmt(s['wikitext2'], s['wikitext2_std'], 3)} | {fmt(s['c4'], s['c4_std'], 3)} | "
                         f"{fmt(s['kl'], s['kl_std'], 5)} | {fmt(s['topk_agreement'], s['topk_agreement_std'], 4)} | "
                         f"{fmt(s['seconds'], s['seconds_std'], 1)} |")
    return "\n".join(lines) + "\n"


def environment(threads: int) -> dict:
    import transformers

    import moeq

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return {"machine": f"{platform.node()}, {cpu}, {os.cpu_count()} cores", "threads": threads,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "moeq": moeq.__version__, "moeq_commit": commit,
            "peer": {}}


# ------------------------------------------------------------------------------------------ main
def parse_args() -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny end-to-end check (explicit flags still win)")
    ap.add_argument("--models", default=",".join(bundled_names()), help="comma list (default: every bundled model)")
    ap.add_argument("--methods", default=",".join(("rtn", "gptq") + OPTIONAL_METHODS),
                    help="moeq methods (comma list); ones moeq does not have are skipped with a note")
    ap.add_argument("--no-autoround", action="store_true", help="moeq rows only")
    ap.add_argument("--full-range", action="store_true",
                    help="moeq rows on the full-range symmetric grid (auto-round's: signed scales, all 2^b integers)")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--group-sizes", default="64,128")
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds of the moeq rows")
    ap.add_argument("--autoround-seeds", default=None, help="seeds of the auto-round rows (default: --seeds)")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    ap.add_argument("--method-calib", choices=("shared", "own"), default="shared",
                    help="shared: every moeq method calibrates on the WikiText-2 ids auto-round gets; own: the "
                         "method's registry default (EBSS for moequant++)")
    ap.add_argument("--autoround-iters", type=int, default=200, help="SignRound iterations per block (default 200)")
    ap.add_argument("--autoround-compile", action="store_true", help="let auto-round torch.compile (its default)")
    ap.add_argument("--eval-windows", type=int, default=None, help="first N perplexity windows per set (default all)")
    ap.add_argument("--fidelity-windows", type=int, default=64, help="WikiText-2 test windows for KL and routing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peer-venv", type=Path, default=PEER_VENV)
    ap.add_argument("--resume", action="store_true", help="keep the cells the results file already has")
    ap.add_argument("--suffix", default="", help="added to the results file name")
    if "--smoke" in sys.argv[1:]:
        ap.set_defaults(**SMOKE)
    args = ap.parse_args()
    args.models, args.bits, args.group_sizes = args.models.split(","), ints(args.bits), ints(args.group_sizes)
    args.seeds = ints(args.seeds)
    args.autoround_seeds = ints(args.autoround_seeds) if args.autoround_seeds else args.seeds
    args.methods = [m for m in args.methods.split(",") if m]
    return args


@dataclass
class Run:
    """What every cell of one model shares."""

    loaded: object  # moeq Loaded: FP model, tokenizer, path
    windows: dict  # evaluation windows, shared by FP and every quantized model
    py: Path | None  # the peer venv's python
    work: Path  # scratch folder (calibration files, worker outputs)
    args: argparse.Namespace
    result: dict


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    methods = moeq_methods(args.methods) + ([] if args.no_autoround else [AUTOROUND])
    py = None if args.no_autoround else ensure_peer_venv(args.peer_venv)
    path = Path(__file__).parent / "results" / f"peer_autoround{args.suffix}.json"
    path.parent.mkdir(exist_ok=True)
    old = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    done = {(r["model"], r["bits"], r["group_size"], r["method"], r["seed"]): r for r in old.get("rows", [])}
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "methods": methods, "symmetric": SYMMETRIC, "pins": PINS, "env": environment(args.threads),
              "fp": old.get("fp", {}), "rows": [], "summary": []}
    result["env"]["peer"] = old.get("env", {}).get("peer", {})

    def save():
        result["summary"] = summarize(result["rows"])
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        path.with_suffix(".md").write_text(render(result))

    with tempfile.TemporaryDirectory(prefix="peer_autoround_") as tmp:
        for model_name in args.models:
            run = Run(load_model(model_name), {}, py, Path(tmp), args, result)
            run_model(run, model_name, methods, done, save)
            del run
    save()
    print(render(result))
    print(f"wrote {path} and {path.with_suffix('.md')}")


def run_model(run: Run, model_name: str, methods: list[str], done: dict, save) -> None:
    """Every (bits, group, method, seed) cell of one model, evaluated against its FP model."""
    args, loaded = run.args, run.loaded
    t = time.perf_counter()
    fp = evaluate_ppl(loaded.model, loaded.tokenizer, ("wikitext2", "c4"), None, None, run.windows,
                      limit=args.eval_windows)
    run.result["fp"][model_name] = {"wikitext2": fp["wikitext2"]["ppl"], "c4": fp["c4"]["ppl"],
                                    "eval_seconds": time.perf_counter() - t}
    calib = {}
    for bits in args.bits:
        for group in args.group_sizes:
            for method in methods:
                for seed in seeds_for(method, args.seeds, args.autoround_seeds):
                    key = (model_name, bits, group, method, seed)
                    if key in done:
                        run.result["rows"].append(done[key])
                        continue
                    if seed is not None and seed not in calib:
                        calib[seed] = calibration(loaded, args.calib_windows, args.seqlen, seed, run.work)
                    row = {"model": model_name, **run_cell(run, method, bits, group, seed, calib.get(seed))}
                    run.result["rows"].append(row)
                    save()
                    print(f"{model_name} W{bits} g{group} {method:<12} seed {seed}: wiki2 {row['wikitext2']:.3f} "
                          f"c4 {row['c4']:.3f} KL {row['kl']:.5f} top-k {row['topk_agreement']:.4f} "
                          f"({row['seconds']:.1f} s quantize, {row['eval_seconds']:.1f} s eval)", flush=True)


def run_cell(run: Run, method: str, bits: int, group: int, seed: int | None, calib) -> dict:
    """One quantization + evaluation; -> a raw result row. ``calib``: (ids, jsonl, safetensors) of the seed."""
    extra = {}
    if method == AUTOROUND:
        model, seconds, meta = run_autoround(run.loaded, run.py, bits, group, seed, calib[2], run.work, run.args)
        run.result["env"]["peer"] = meta["env"]
        extra = {"calib": "wikitext2 (shared ids)", "autoround": {k: meta[k] for k in (
            "settings", "quantized_linears", "quantized_expert_linears", "max_integer_residual",
            "max_distinct_per_group", "worker_seconds", "driver_check")}}
    else:
        source = None if run.args.method_calib == "own" or seed is None else str(calib[1])
        model, seconds, extra = run_moeq(run.loaded, method, bits, group, source, seed, run.args)
    t = time.perf_counter()
    metrics = evaluate(run.loaded.model, model, run.loaded.tokenizer, run.windows, run.args)
    return {"bits": bits, "group_size": group, "method": method, "seed": seed, **metrics, "seconds": seconds,
            "eval_seconds": time.perf_counter() - t, **extra}


if __name__ == "__main__":
    main()
