"""Batched-over-experts GPTQ vs one expert at a time, on the bundled models (same results, less time).

The experts of an MoE layer have equal shapes, so moeq solves them in one batched GPTQ call
(damping, Cholesky, column loop and lazy updates run once for all E experts). This script times the
whole block loop (``quantize_model``: calibration forwards, Hessians, solves) both ways on the same
calibration ids, checks the two produce the same integers, and prints the speed-up.

    python benchmarks/gptq_batched.py --model qwen2-moe-tiny --model mixtral-tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("MOEQ_QUIET", "1")

from moeq.calib.windows import calibration_windows  # noqa: E402
from moeq.capture.sequential import quantize_model  # noqa: E402
from moeq.config import BitPlan, CalibSpec, QuantConfig  # noqa: E402
from moeq.models.adapter import ModelAdapter  # noqa: E402
from moeq.models.loading import load_model  # noqa: E402
from moeq.quant.primitives import QuantArgs  # noqa: E402


def time_loop(base, ids, batched: bool, bits: int):
    m = copy.deepcopy(base.model)
    ad = ModelAdapter.for_model(m).unfuse()
    cfg = QuantConfig(method="gptq", plan=BitPlan(default=QuantArgs(bits, 128, True)),
                      calib=CalibSpec("wikitext2", ids.shape[0], ids.shape[1]), batched_solve=batched)
    t = time.perf_counter()
    loop = quantize_model(ad, cfg, ids, "cpu", base.storage_dtype)
    return time.perf_counter() - t, loop


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args()
    results = []
    for name in args.model or ["qwen2-moe-tiny", "mixtral-tiny"]:
        base = load_model(name)
        ids = calibration_windows(base.tokenizer, "wikitext2", args.nsamples, args.seqlen).ids
        t_one, one = time_loop(base, ids, False, args.bits)
        t_bat, bat = time_loop(base, ids, True, args.bits)
        same = all(torch.equal(one.results[k].q, bat.results[k].q) for k in one.results)
        solve_one = sum(r["seconds"] for r in one.rows.values())
        solve_bat = sum(r["seconds"] for r in bat.rows.values())
        results.append({"model": name, "one_by_one_s": t_one, "batched_s": t_bat, "speedup": t_one / t_bat,
                        "solve_one_by_one_s": solve_one, "solve_batched_s": solve_bat,
                        "solve_speedup": solve_one / solve_bat, "identical_integers": same})
    print(f"{'model':<16} {'one-by-one':>11} {'batched':>9} {'speed-up':>9} {'solve 1x1':>10} {'solve bat':>10} "
          f"{'speed-up':>9} same-ints")
    for r in results:
        print(f"{r['model']:<16} {r['one_by_one_s']:10.1f}s {r['batched_s']:8.1f}s {r['speedup']:8.2f}x "
              f"{r['solve_one_by_one_s']:9.1f}s {r['solve_batched_s']:9.1f}s {r['solve_speedup']:8.2f}x {r['identical_integers']}")
    out = Path(__file__).parent / "results" / "gptq_batched.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "threads": torch.get_num_threads(), "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
