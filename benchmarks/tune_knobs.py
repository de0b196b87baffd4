"""The block tuner's knobs on one peer-benchmark cell: how its defaults (steps, lr, precision, MoE terms) were chosen.

Runs ``--method blocktune`` on one bundled model, bit width, group size and calibration seed, exactly as
benchmarks/peer_autoround.py runs its moeq rows (the same 128 x 512 WikiText-2 calibration ids, symmetric
integers, ``--full-range`` grid, the same evaluation: perplexity on the first 64 WikiText-2 / C4 windows,
KL(FP || Q) and top-k routing agreement on the first 16), with the given TuneKnobs fields overridden
(``key=value``), and appends one row to benchmarks/results/tune_knobs.jsonl (printing it too). Compare a
row with that cell's auto-round row in benchmarks/results/peer_autoround_*.json.

    python benchmarks/tune_knobs.py qwen2-moe-tiny 2 64 0 steps=100 lr=0.005 scale_lr=0.005 precision=fp32

Wall time is calibration + quantization, one thread; say what else ran on the machine when you quote it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("MOEQ_QUIET", "1")
sys.path.insert(0, str(Path(__file__).parent))

import peer_autoround as pa  # noqa: E402
from moeq.config import BitPlan, CalibSpec, QuantConfig  # noqa: E402
from moeq.models.loading import load_model  # noqa: E402
from moeq.pipeline import quantize_loaded  # noqa: E402
from moeq.quant.primitives import QuantArgs  # noqa: E402
from moeq.solvers.blocktune import TuneKnobs  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "tune_knobs.jsonl"


def knob(text: str) -> tuple[str, object]:
    """'key=value' -> (TuneKnobs field, value of the field's type)."""
    key, _, value = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(TuneKnobs)}
    if key not in fields:
        raise argparse.ArgumentTypeError(f"unknown tuner knob {key!r}; one of {', '.join(fields)}")
    default = getattr(TuneKnobs(), key)
    return key, (value.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("bits", type=int)
    ap.add_argument("group", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("knobs", nargs="*", type=knob, help="TuneKnobs overrides, key=value")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    knobs = dict(args.knobs)
    loaded = load_model(args.model)
    evaluation = argparse.Namespace(eval_windows=64, fidelity_windows=16)
    with tempfile.TemporaryDirectory(prefix="tune_knobs_") as tmp:
        _, jsonl, _ = pa.calibration(loaded, 128, 512, args.seed, Path(tmp))
        cfg = QuantConfig(method="blocktune", plan=BitPlan(default=QuantArgs(args.bits, args.group, True, full_range=True)),
                          calib=CalibSpec(str(jsonl), 128, 512, args.seed), tune=TuneKnobs(**knobs))
        q = quantize_loaded(loaded, cfg)
    row = {"model": args.model, "bits": args.bits, "group_size": args.group, "seed": args.seed, "knobs": knobs,
           "tuner": dataclasses.asdict(cfg.tune), "seconds": q.seconds["calibration"] + q.seconds["quantize"],
           **pa.evaluate(loaded.model, q.model, loaded.tokenizer, {}, evaluation)}
    print(json.dumps(row))
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
