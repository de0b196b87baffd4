"""Wall time, per-rank peak memory and the solve-time split of ``moeq quantize`` on 1 and N processes (issue 12).

For each model and each process count in --ranks, this runs the real CLI: ``python -m moeq quantize MODEL ...``
for 1 and ``python -m torch.distributed.run --standalone --nproc-per-node N -m moeq quantize MODEL ...`` for N,
with --threads-per-process threads in each (default: the cores divided by N, so every run uses the whole
machine), and reads each run's report.json:

* wall time of the command, and the run's own calibration / quantize / export seconds;
* peak memory per rank: each process's own high-water mark (VmHWM; torchrun starts every rank as a fresh
  process) and, on GPUs, its peak CUDA allocation;
* the solve split: linears each rank solved and their summed solve seconds (report rows carry the rank);
* whether the N-process checkpoint is bit-identical to the 1-process one (only meaningful when both ran with
  the same threads per process: the thread count changes float results; --same-threads forces it).

Results: benchmarks/results/distributed<tag>.json and .md (also printed). On this project's 2-core CPU two
processes cannot be faster than one process with two threads; what the CPU shows is the memory and work split.

    python benchmarks/distributed.py                                           # qwen2-moe-tiny, 1 and 2 ranks
    python benchmarks/distributed.py --model /tmp/moeq_scale/qwen3_moe_0.5gb --args "--nsamples 16 --seqlen 256"
    python benchmarks/distributed.py --device cuda --ranks 1 2 4 8             # a GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(model: str, ranks: int, args: list[str], device: str, threads: int, work: Path) -> dict:
    out = work / f"q{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    launcher = [sys.executable, "-m", "moeq"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "moeq"]
    cmd = [*launcher, "quantize", model, *args, "--device", device, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MOEQ_QUIET": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {shlex.join(cmd)}\n{r.stderr[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    if ranks == 1:
        per = [{"rank": 0, "peak_memory_mb": rep["peak_memory_mb"], "linears_solved": len(rep["modules"]),
                "solve_seconds": round(sum(m.get("seconds", 0) for m in rep["modules"]), 3)}]
    else:
        per = rep["distributed"]["ranks"]
    return {"model": model, "ranks": ranks, "threads_per_process": threads, "device": device,
            "command": shlex.join(cmd), "wall_s": round(wall, 2), "seconds": rep["seconds"], "per_rank": per,
            "loadavg_after": os.getloadavg(), "out": str(out)}


def identical(a: str, b: str) -> bool:
    """Every tensor of the two checkpoints equal (a child process: this driver never imports torch)."""
    code = ("import sys,glob,torch;from safetensors.torch import load_file\n"
            "L=lambda d:{k:v for f in sorted(glob.glob(d+'/*.safetensors')) for k,v in load_file(f).items()}\n"
            "a,b=L(sys.argv[1]),L(sys.argv[2]);sys.exit(0 if a.keys()==b.keys() and all(torch.equal(a[k],b[k]) "
            "for k in a) else 1)")
    return subprocess.run([sys.executable, "-c", code, a, b]).returncode == 0


def table(rows: list[dict]) -> str:
    lines = ["| model | ranks | threads/rank | wall s | calib + quantize s | peak RSS per rank (MiB) | "
             "peak CUDA per rank (MiB) | linears solved per rank | solve s per rank | same tensors as 1 rank |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["per_rank"]
        cuda = " / ".join(str(x["peak_memory_mb"].get("cuda_allocated", "-")) for x in p)
        lines.append(f"| {Path(r['model']).name} | {r['ranks']} | {r['threads_per_process']} | {r['wall_s']} | "
                     f"{r['seconds']['calibration'] + r['seconds']['quantize']:.1f} | "
                     f"{' / '.join(str(x['peak_memory_mb']['cpu_rss']) for x in p)} | {cuda} | "
                     f"{' / '.join(str(x['linears_solved']) for x in p)} | "
                     f"{' / '.join(str(x['solve_seconds']) for x in p)} | {r.get('identical', '-')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=["qwen2-moe-tiny"])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--args", default="--nsamples 128 --seqlen 512 --skip-eval", help="more quantize flags")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads-per-process", type=int, default=None, help="default: cores // ranks")
    ap.add_argument("--same-threads", action="store_true", help="every run with --threads-per-process (default 1)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--tag", default="")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moeq-dist-bench-"))
    args = ["--method", a.method, *shlex.split(a.args)]
    rows = []
    cores = os.cpu_count() or 1
    for model in a.model:
        for rep in range(a.repeat):
            first = None
            for n in a.ranks:
                threads = (a.threads_per_process or 1) if a.same_threads else (
                    a.threads_per_process or max(1, cores // n))
                row = run_one(model, n, args, a.device, threads, work)
                row["repeat"] = rep
                if first is None:
                    first = row
                else:
                    row["identical"] = identical(first["out"], row["out"]) if (
                        row["threads_per_process"] == first["threads_per_process"] or a.device != "cpu") else "-"
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    meta = {"cpu_count": cores, "method": a.method, "args": a.args, "device": a.device,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (res / f"distributed{a.tag}.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    md = (f"# moeq quantize on 1 and N processes ({a.method}, `{a.args}`, device {a.device}, {cores} cores, "
          f"{meta['date']})\n\n" + table(rows) + "\n")
    (res / f"distributed{a.tag}.md").write_text(md)
    print(md)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
