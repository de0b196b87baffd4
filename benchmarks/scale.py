"""Peak memory and wall time of ``moeq quantize`` against checkpoint size (issue 11, "Scale").

The claim to show: when moeq streams a checkpoint block by block, its peak memory is flat in the model size
(a fixed part plus about one block), not a multiple of the checkpoint. For each size in --sizes this script
writes (or reuses, when a complete one with the same settings is there) a random-init Qwen3-MoE checkpoint
under --work with benchmarks/synthetic_ckpt.py (hidden 1024, 64 experts of 512, top-4, vocab 8192; about
0.207 GB per layer in bf16, so the size sets the layer count), then runs the moeq CLI as a child process for
each method and measures:

* wall time, and the child's CPU time (user + system) from its rusage;
* the child's peak RSS from ``os.wait4`` (``ru_maxrss``, the kernel's high-water mark) and an RSS-vs-time trace
  sampled from /proc/<pid>/status (VmRSS) every --sample-interval seconds (saved as JSON, optional plot);
* the size and the number of shards of the quantized output (deleted afterwards unless --keep);
* the load average before and after each run (os.getloadavg), since other work on the machine skews times;
* once per moeq tree, the "floor": peak RSS of a child that only imports moeq.cli (torch, transformers).

Each run is ``python -m moeq.cli quantize CKPT --method M --bits 4 --skip-eval --out OUT --overwrite`` with
MOEQ_QUIET=1 (plus --calib-args, default ``--nsamples 16 --seqlen 256``, for every method but rtn, and
--moeq-args for all). With --baseline-src DIR the same commands also run with PYTHONPATH=DIR (an older moeq's
src/, e.g. ``git -C /work/main worktree add /tmp/moeq_base efabb52`` then ``--baseline-src /tmp/moeq_base/src``)
for sizes up to --baseline-max-gb, interleaved with the new runs, and the tables give new/old ratios of wall
time and peak RSS measured in the same session. Each cell runs --repeat times; every run is reported.

Peak RSS is exact for the child because this driver never imports torch: Linux carries the spawning
process's RSS high-water mark into the child's ru_maxrss at exec (a driver holding 0.8 GB makes even
``python -c pass`` report 0.8 GB), so checkpoints are planned and written by synthetic_ckpt.py in child
processes too; each run records the driver's own peak (about 20 MB) as the bound of that effect.

A freshly written checkpoint is in the page cache when the first run reads it (unless it is bigger than
the free RAM), so load times of the first cell are optimistic; memory numbers are RSS (private + mapped file
pages the process touched) and do not count the page cache.

Results: benchmarks/results/scale<tag>.json (rewritten after every run), scale<tag>.md (the tables, also
printed), scale<tag>_trace.json (the RSS traces) and, with --plot, scale<tag>_rss.png.

    python benchmarks/scale.py                                   # 0.5, 2 and 8 GB; rtn and gptq
    python benchmarks/scale.py --sizes 0.5 2 8 26 --plot         # 26 GB: bigger than this machine's 24 GiB RAM
    git -C /work/main worktree add /tmp/moeq_base efabb52
    python benchmarks/scale.py --sizes 0.5 2 --baseline-src /tmp/moeq_base/src
    python benchmarks/scale.py --sizes 0.25 0.45 --methods rtn --tag _smoke    # quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("MOEQ_QUIET", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SYNTH = HERE / "synthetic_ckpt.py"
META_FILE = "synthetic_ckpt.json"  # written by synthetic_ckpt.py into each checkpoint

GB = 10**9
MAX_TRACE_POINTS = 2000

# This process stays small on purpose (no torch/transformers here: checkpoint planning and writing run in
# child processes). Linux carries the spawning process's RSS high-water mark into a child's ru_maxrss at
# exec, so a driver that had imported torch (~0.4 GB) would put a floor under every measured peak.


# --------------------------------------------------------------------------------------------- measuring


def _rss(pid: int) -> tuple[int, int, int] | None:
    """(VmRSS, RssAnon, RssFile) of ``pid`` in bytes (None once it is gone). RssFile counts mapped file
    pages (e.g. an mmap-ed safetensors shard), which the kernel can drop; RssAnon is the process's own memory."""
    try:
        with open(f"/proc/{pid}/status") as f:
            v = {k: int(rest.split()[0]) * 1024 for k, _, rest in (line.partition(":") for line in f)
                 if k in ("VmRSS", "RssAnon", "RssFile")}
        return v["VmRSS"], v.get("RssAnon", 0), v.get("RssFile", 0)
    except (FileNotFoundError, ProcessLookupError, PermissionError, KeyError, ValueError):
        return None


def _downsample(trace: list[tuple], n: int = MAX_TRACE_POINTS) -> list[tuple]:
    """At most ``n`` points; each bucket keeps its highest sample, so peaks survive."""
    if len(trace) <= n:
        return trace
    step = len(trace) / n
    return [max(trace[int(i * step): max(int(i * step) + 1, int((i + 1) * step))], key=lambda p: p[1])
            for i in range(n)]


def measure(cmd: list[str], env: dict, cwd: str | Path, log_path: Path, timeout: float,
            interval: float = 0.2) -> dict:
    """Run ``cmd`` as a child; wall time, peak RSS (wait4 rusage), CPU time and an RSS trace."""
    assert "torch" not in sys.modules, "the driver must stay small (see the note at the top)"
    spawner_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trace: list[tuple[float, int, int]] = []  # (seconds, VmRSS, RssAnon)
    peak_file = [0]
    done = threading.Event()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        killed = {"timeout": False}

        def sample():
            while not done.is_set():
                rss = _rss(p.pid)
                if rss is not None:
                    trace.append((round(time.perf_counter() - t0, 3), rss[0], rss[1]))
                    peak_file[0] = max(peak_file[0], rss[2])
                done.wait(interval)

        def kill():
            killed["timeout"] = True
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:  # Ctrl-C: do not leave the child running
            kill()
            os.wait4(p.pid, 0)
            raise
        finally:
            timer.cancel()
            done.set()
        wall = time.perf_counter() - t0
        sampler.join()
    p.returncode = rc = os.waitstatus_to_exitcode(status)
    return {"rc": rc, "timed_out": killed["timeout"], "wall_s": wall, "peak_rss_bytes": ru.ru_maxrss * 1024,
            "cpu_s": ru.ru_utime + ru.ru_stime, "max_sampled_rss_bytes": max((r[1] for r in trace), default=0),
            "max_sampled_anon_bytes": max((r[2] for r in trace), default=0), "max_sampled_file_bytes": peak_file[0],
            "n_samples": len(trace), "driver_peak_rss_bytes": spawner_rss, "trace": _downsample(trace)}


def _log_tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return "\n".join(line for line in lines[-n:] if line.strip())


def _dir_size(path: Path) -> tuple[int, int]:
    """(bytes of every file under path, number of .safetensors files)."""
    if not path.is_dir():
        return 0, 0
    files = [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), sum(f.suffix == ".safetensors" for f in files)


def _free(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------- setup


def child_env(src: str | None) -> dict:
    env = dict(os.environ, MOEQ_QUIET="1")
    if src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve())] + (
            [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if "MOEQ_DATA_DIR" not in env:  # a baseline tree under /tmp would not find the repo's shared/data itself
        data = REPO.parent / "shared" / "data"
        if data.is_dir():
            env["MOEQ_DATA_DIR"] = str(data)
    return env


def describe_moeq(env: dict, cwd: Path) -> dict:
    """Which moeq the children import (path, git commit and whether the tree has local changes)."""
    r = subprocess.run([sys.executable, "-c", "import moeq, os; print(os.path.dirname(moeq.__file__))"],
                       env=env, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        return {"path": None, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    path = r.stdout.strip()
    info = {"path": path}
    g = subprocess.run(["git", "-C", path, "describe", "--always", "--dirty"], capture_output=True, text=True)
    if g.returncode == 0:
        info["git"] = g.stdout.strip()
    return info


def plan_checkpoint(size_gb: float, args) -> dict:
    """Layers and bytes of the synthetic checkpoint for ``size_gb`` (synthetic_ckpt.py --plan-only, a child)."""
    r = subprocess.run([sys.executable, str(SYNTH), "--arch", "qwen3_moe", "--size-gb", f"{size_gb:g}",
                        "--shard-size", args.shard_size, "--plan-only"], capture_output=True, text=True,
                       env=child_env(None))
    if r.returncode:
        raise RuntimeError(f"synthetic_ckpt.py --plan-only failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def is_complete(path: Path) -> bool:
    """A checkpoint synthetic_ckpt.py finished: meta, config, index, and every shard at its header's size."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        idx = json.loads((path / "model.safetensors.index.json").read_text())
        files = set(idx["weight_map"].values())
        if not (path / "config.json").is_file() or len(files) != meta["n_shards"]:
            return False
        for f in files:
            with open(path / f, "rb") as h:
                n = struct.unpack("<Q", h.read(8))[0]
                header = json.loads(h.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if (path / f).stat().st_size != 8 + n + end:
                return False
        return True
    except (OSError, ValueError, KeyError, struct.error):
        return False


def ensure_checkpoint(size_gb: float, args, results: dict) -> dict | None:
    """The checkpoint for ``size_gb`` (reused when complete and equal in settings, else written)."""
    plan = plan_checkpoint(size_gb, args)
    planned, layers = plan["total_size"], plan["layers"]
    path = Path(args.work) / f"qwen3_moe_{size_gb:g}gb"
    info = {"size_gb": size_gb, "path": str(path), "layers": layers, "bytes": planned}
    if path.exists():
        meta_file = path / META_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        same = meta and (meta.get("layers"), meta.get("seed"), meta.get("total_size"), meta.get("fp8"),
                         meta.get("dtype")) == (layers, args.seed, planned, False, "bfloat16")
        if same and is_complete(path):
            print(f"reusing {path} ({planned / GB:.3f} GB, {layers} layers)", flush=True)
            return {**info, "written": False}
        if meta is None:
            print(f"error: {path} exists and was not written by synthetic_ckpt.py; not touching it", flush=True)
            return None
        print(f"{path} is incomplete or has other settings: rewriting it", flush=True)
        shutil.rmtree(path)
    out_est = _out_estimate(planned, args)
    free = _free(Path(args.work))
    if planned + out_est + args.margin_gb * GB > free:
        msg = (f"not enough disk for the {size_gb:g} GB cell: checkpoint {planned / GB:.2f} GB + output about "
               f"{out_est / GB:.2f} GB + margin {args.margin_gb:g} GB > {free / GB:.2f} GB free on {args.work}")
        print(f"error: {msg}; skipping this size", flush=True)
        results["skipped"].append({"size_gb": size_gb, "reason": msg})
        return None
    for stale in Path(args.work).glob(f".{path.name}.partial-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    print(f"writing {path}: {planned / GB:.3f} GB, {layers} layers ...", flush=True)
    cmd = [sys.executable, str(SYNTH), "--arch", "qwen3_moe", "--size-gb", f"{size_gb:g}",
           "--out", str(path), "--seed", str(args.seed), "--shard-size", args.shard_size]
    m = measure(cmd, child_env(None), args.work, Path(args.work) / "logs" / f"write_{size_gb:g}gb.log",
                args.timeout, args.sample_interval)
    m.pop("trace")
    if m["rc"] or not is_complete(path):
        tail = _log_tail(Path(args.work) / "logs" / f"write_{size_gb:g}gb.log")
        print(f"error: writing {path} failed (rc {m['rc']}):\n{tail}", flush=True)
        results["skipped"].append({"size_gb": size_gb, "reason": f"checkpoint writer failed (rc {m['rc']})"})
        return None
    print(f"  wrote in {m['wall_s']:.1f} s, writer peak RSS {m['peak_rss_bytes'] / GB:.3f} GB", flush=True)
    results["writes"].append({**info, **m})
    return {**info, "written": True}


def _out_estimate(ckpt_bytes: int, args) -> int:
    """Rough size of one quantized output (packed ints + group scales, bf16 embeddings), with slack."""
    return int(ckpt_bytes * (args.bits / 16 + 0.1)) + 64 * 2**20


# --------------------------------------------------------------------------------------------- reporting


def _g(b: float) -> str:
    return f"{b / GB:.3f}"


def render(results: dict) -> str:
    runs = results["runs"]
    title = "# moeq peak memory vs checkpoint size" + (f" ({results['tag']})" if results["tag"] else "")
    lines = [title, "",
             f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['mem_gb']:.1f} GB RAM, "
             f"{results['machine']['platform']}; started {results['started']}.",
             "Synthetic Qwen3-MoE checkpoints (hidden 1024, 64 experts x 512, top-4, bf16); "
             f"`moeq quantize --bits {results['args']['bits']} --skip-eval` "
             f"(non-rtn methods with `{results['args']['calib_args']}`"
             f"{', plus `' + results['args']['moeq_args'] + '`' if results['args']['moeq_args'] else ''}).", ""]
    for label, tree in results["trees"].items():
        floor = tree.get("floor_rss_bytes")
        lines.append(f"* moeq **{label}**: {tree['moeq'].get('path')} ({tree['moeq'].get('git', 'no git')})"
                     + (f"; import-only floor RSS {_g(floor)} GB" if floor else "")
                     + (f"; error: {tree['moeq']['error']}" if tree["moeq"].get("error") else ""))
    lines += ["", "Peak RSS: the child's ru_maxrss (os.wait4); anon: the highest sampled RssAnon (without mapped "
              "file pages); load: 1-minute load average.", "",
              "| ckpt GB | layers | method | moeq | run | wall s | peak RSS GB | RSS / ckpt | anon GB | output GB "
              "| shards | CPU s | load before -> after | rc |", "|" + "---|" * 14]
    for r in runs:
        ok = r["rc"] == 0
        lines.append(
            f"| {r['ckpt_bytes'] / GB:.3f} | {r['layers']} | {r['method']} | {r['tree']} | {r['repeat']} "
            f"| {r['wall_s']:.1f} | {_g(r['peak_rss_bytes'])} | {r['peak_rss_bytes'] / r['ckpt_bytes']:.2f} "
            f"| {_g(r.get('max_sampled_anon_bytes', 0))} "
            f"| {_g(r['out_bytes']) if ok else '-'} | {r['out_shards'] if ok else '-'} | {r['cpu_s']:.0f} "
            f"| {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f} "
            f"| {_rc(r)} |")
    ratios = ratio_rows(runs)
    if ratios:
        lines += ["", "New / baseline (medians over the runs of each cell, same session):", "",
                  "| ckpt GB | method | wall new/old | peak RSS new/old | peak RSS GB new, old |",
                  "|---|---|---|---|---|"]
        for q in ratios:
            lines.append(f"| {q['ckpt_gb']:.3f} | {q['method']} | {q['wall_ratio']:.2f} | {q['rss_ratio']:.2f} "
                         f"| {q['rss_new_gb']:.3f}, {q['rss_old_gb']:.3f} |")
    if results["writes"]:
        lines += ["", "Checkpoints written in this session (benchmarks/synthetic_ckpt.py):", "",
                  "| ckpt GB | layers | write s | writer peak RSS GB |", "|---|---|---|---|"]
        for w in results["writes"]:
            lines.append(f"| {w['bytes'] / GB:.3f} | {w['layers']} | {w['wall_s']:.1f} | {_g(w['peak_rss_bytes'])} |")
    if results["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{s['size_gb']:g} GB ({s['reason']})" for s in results["skipped"])]
    failed = [r for r in runs if r["rc"]]
    for r in failed:
        lines += ["", f"Run {r['name']} failed (rc {_rc(r)}); log tail:", "```", r.get("log_tail", ""), "```"]
    w8 = results.get("w8_check")
    if w8:
        lines += ["", f"W8 RTN of the {w8['size_gb']:g} GB checkpoint ({w8['shards']} shards, peak RSS "
                  f"{w8['peak_rss_gb']:.2f} GB) reloaded in plain transformers, logits on 2 x 64 random tokens vs the FP "
                  f"model's: relative error {w8.get('rel_err', float('nan')):.4f}, cosine "
                  f"{w8.get('cosine', float('nan')):.6f}, top-1 agreement {w8.get('top1_agree', float('nan')):.3f}"]
    return "\n".join(lines) + "\n"


def _rc(r: dict) -> str:
    if r["timed_out"]:
        return f"{r['rc']} (timeout)"
    if r["rc"] < 0:
        return f"{r['rc']} ({signal.Signals(-r['rc']).name}{', OOM?' if r['rc'] == -9 else ''})"
    return str(r["rc"])


def ratio_rows(runs: list[dict]) -> list[dict]:
    cells: dict = {}
    for r in runs:
        if r["rc"] == 0:
            cells.setdefault((r["size_gb"], r["method"]), {}).setdefault(r["tree"], []).append(r)
    out = []
    for (size, method), by in cells.items():
        if "new" in by and "baseline" in by:
            med = {t: (statistics.median(x["wall_s"] for x in by[t]),
                       statistics.median(x["peak_rss_bytes"] for x in by[t])) for t in ("new", "baseline")}
            out.append({"size_gb": size, "ckpt_gb": by["new"][0]["ckpt_bytes"] / GB, "method": method,
                        "wall_ratio": med["new"][0] / med["baseline"][0],
                        "rss_ratio": med["new"][1] / med["baseline"][1],
                        "rss_new_gb": med["new"][1] / GB, "rss_old_gb": med["baseline"][1] / GB})
    return out


def save(results: dict, traces: dict, args) -> str:
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"scale{args.tag}"
    results["ratios"] = ratio_rows(results["runs"])
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out / f"{stem}_trace.json").write_text(json.dumps(
        {"interval_s": args.sample_interval, "columns": ["seconds", "VmRSS bytes", "RssAnon bytes"],
         "runs": traces}))
    md = render(results)
    (out / f"{stem}.md").write_text(md)
    return md


def plot(traces: dict, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in results["runs"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for r in results["runs"]:
            if r["method"] == method and r["name"] in traces and traces[r["name"]]:
                t, rss = list(zip(*traces[r["name"]]))[:2]
                ax.plot(t, [x / GB for x in rss], ls="-" if r["tree"] == "new" else "--",
                        label=f"{r['ckpt_bytes'] / GB:.2f} GB ckpt, {r['tree']}, run {r['repeat']}")
        ax.set_title(f"moeq quantize --method {method}")
        ax.set_xlabel("seconds")
        ax.set_ylabel("RSS (GB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


LOGITS = r"""
import sys, torch, transformers
torch.set_num_threads(2)
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
ids = torch.randint(1, 8000, (2, 64), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save(m(input_ids=ids).logits.float(), sys.argv[2])
"""


def w8_check(size: float, args, results: dict) -> None:
    """W8 RTN of the size's checkpoint, reloaded in plain transformers: logits against the FP model's (each
    model loaded by its own child process, one after the other, so memory holds one model at a time)."""
    ck = ensure_checkpoint(size, args, results)
    work, env = Path(args.work), child_env(args.src)
    out = work / f"out_{size:g}gb_w8_check"
    cmd = [sys.executable, "-m", "moeq.cli", "quantize", ck["path"], "--method", "rtn", "--bits", "8", "--skip-eval",
           "--out", str(out), "--overwrite"]
    run = measure(cmd, env, work, work / "logs" / f"w8_{size:g}.log", args.timeout, args.sample_interval)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    row = {"size_gb": size, "rc": run["rc"], "wall_s": run["wall_s"], "peak_rss_gb": run["peak_rss_bytes"] / GB,
           "shards": len(files)}
    for label, path in (("fp", ck["path"]), ("w8", str(out))):
        r = subprocess.run([sys.executable, "-c", LOGITS, path, str(work / f"logits_{label}.pt")], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            row[f"{label}_error"] = r.stderr[-500:]
    if all(f"{k}_error" not in row for k in ("fp", "w8")):
        import torch  # only now: the driver's own memory does not leak into the children measured above

        a, b = (torch.load(work / f"logits_{k}.pt") for k in ("fp", "w8"))
        row.update(rel_err=float((a - b).norm() / a.norm()),
                   cosine=float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0)),
                   top1_agree=float((a.argmax(-1) == b.argmax(-1)).float().mean()))
    results["w8_check"] = row
    print(f"W8 RTN check at {size:g} GB: {json.dumps(row)}", flush=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.5, 2, 8], help="checkpoint sizes in GB (1e9 bytes)")
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--calib-args", default="--nsamples 16 --seqlen 256", help="flags for every method but rtn")
    ap.add_argument("--moeq-args", default="", help="extra flags passed to every moeq run")
    ap.add_argument("--work", default="/tmp/moeq_scale", help="checkpoints, outputs and logs")
    ap.add_argument("--keep", action="store_true",
                    help="keep the quantized outputs (default: delete each after measuring)")
    ap.add_argument("--src", help="PYTHONPATH for the runs under test (default: the moeq this Python imports)")
    ap.add_argument("--baseline-src", help="an older moeq's src/ to run the same commands with (PYTHONPATH)")
    ap.add_argument("--baseline-max-gb", type=float, default=2.0, help="largest size the baseline runs at")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell (each one reported)")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per run before it is killed")
    ap.add_argument("--sample-interval", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0, help="checkpoint seed")
    ap.add_argument("--shard-size", default="1GB", help="shard size of the synthetic checkpoints")
    ap.add_argument("--margin-gb", type=float, default=1.0, help="disk left free beyond what a cell needs")
    ap.add_argument("--no-floor", action="store_true", help="skip the import-only RSS measurement")
    ap.add_argument("--plot", action="store_true", help="RSS-vs-time plot (matplotlib)")
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    ap.add_argument("--tag", default="", help="suffix of the result files, e.g. _smoke")
    ap.add_argument("--w8-check", type=float, default=None, metavar="GB",
                    help="after the runs: W8 RTN of this size reloaded in transformers, logits vs the FP model's")
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    results = {"tag": args.tag, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
               "machine": {"cpus": os.cpu_count(), "mem_gb": mem / GB, "platform": platform.platform(),
                           "python": sys.version.split()[0]},
               "trees": {}, "writes": [], "skipped": [], "runs": []}
    traces: dict = {}
    trees = {"new": args.src}
    if args.baseline_src:
        trees["baseline"] = args.baseline_src
    for label, src in trees.items():
        env = child_env(src)
        tree = {"src": src, "moeq": describe_moeq(env, work), "data_dir": env.get("MOEQ_DATA_DIR")}
        print(f"moeq {label}: {tree['moeq']}", flush=True)
        if not args.no_floor and tree["moeq"].get("path"):
            m = measure([sys.executable, "-c", "import moeq.cli, torch, transformers"], env, work,
                        work / "logs" / f"floor_{label}.log", 600, args.sample_interval)
            tree["floor_rss_bytes"] = m["peak_rss_bytes"] if m["rc"] == 0 else None
            print(f"  import-only floor: peak RSS {_g(m['peak_rss_bytes'])} GB (rc {m['rc']})", flush=True)
        results["trees"][label] = tree

    calib = shlex.split(args.calib_args)
    extra = shlex.split(args.moeq_args)
    for size in args.sizes:
        ck = ensure_checkpoint(size, args, results)
        if ck is None:
            save(results, traces, args)
            continue
        labels = ["new"] + (["baseline"] if args.baseline_src and size <= args.baseline_max_gb else [])
        for method in args.methods:
            for rep in range(1, args.repeat + 1):
                for label in labels:  # interleaved, so drift on the machine hits both trees alike
                    name = f"{size:g}gb_{method}_{label}_r{rep}"
                    out = work / f"out_{name}"
                    need = _out_estimate(ck["bytes"], args)
                    if _free(work) < need + args.margin_gb * GB:
                        msg = f"not enough disk for the output of {name} (about {need / GB:.2f} GB)"
                        print(f"error: {msg}; skipping", flush=True)
                        results["skipped"].append({"size_gb": size, "reason": msg})
                        continue
                    cmd = [sys.executable, "-m", "moeq.cli", "quantize", ck["path"], "--method", method,
                           "--bits", str(args.bits), "--skip-eval", "--out", str(out), "--overwrite"]
                    cmd += ([] if method == "rtn" else calib) + extra
                    print(f"[{name}] {shlex.join(cmd[1:])}", flush=True)
                    load_before = _load()
                    log_path = work / "logs" / f"{name}.log"
                    m = measure(cmd, child_env(trees[label]), work, log_path, args.timeout, args.sample_interval)
                    load_after = _load()
                    out_bytes, shards = _dir_size(out)
                    report = {}
                    try:
                        rep_json = json.loads((out / "report.json").read_text())
                        report = {"seconds": rep_json.get("seconds"),
                                  "peak_memory_mb": rep_json.get("peak_memory_mb")}
                    except (OSError, ValueError):
                        pass
                    traces[name] = m.pop("trace")
                    row = {"name": name, "size_gb": size, "ckpt_bytes": ck["bytes"], "layers": ck["layers"],
                           "method": method, "tree": label, "repeat": rep, "cmd": cmd, **m,
                           "load_before": load_before, "load_after": load_after, "out_bytes": out_bytes,
                           "out_shards": shards, "moeq_report": report, "log": str(log_path)}
                    if m["rc"]:
                        row["log_tail"] = _log_tail(log_path)
                    results["runs"].append(row)
                    print(f"  rc {_rc(m)}, wall {m['wall_s']:.1f} s, "
                          f"peak RSS {_g(m['peak_rss_bytes'])} GB ({m['peak_rss_bytes'] / ck['bytes']:.2f}x ckpt), "
                          f"output {_g(out_bytes)} GB in {shards} shards, load {load_before[0]} -> {load_after[0]}",
                          flush=True)
                    if m["rc"]:
                        print("  " + row["log_tail"].replace("\n", "\n  "), flush=True)
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
                    save(results, traces, args)
    if args.w8_check is not None:
        w8_check(args.w8_check, args, results)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    md = save(results, traces, args)
    if args.plot and results["runs"]:
        png = Path(args.results_dir) / f"scale{args.tag}_rss.png"
        plot(traces, results, png)
        print(f"plot: {png}")
    print()
    print(md)
    return 0 if results["runs"] and all(r["rc"] == 0 for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
