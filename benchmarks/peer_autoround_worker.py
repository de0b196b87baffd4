"""Worker of benchmarks/peer_autoround.py: runs Intel auto-round (SignRound) inside its own pinned venv.

Never imports moeq: the driver (moeq's environment) writes a job JSON and the calibration token ids, starts
this file with the peer venv's python, and reads back what it writes into the job's ``out`` folder:

* ``weights.safetensors``: for every linear auto-round quantized, ``<module name>.weight`` = the dequantized
  weight (q - zp) * scale in float32, rebuilt from auto-round's own integers and scales (see
  :func:`dequantized`), named per expert (``model.layers.0.mlp.experts.3.gate_proj.weight``);
* ``meta.json``: wall times, versions, the resolved auto-round settings and the verification counts.

auto-round 0.16 unfuses transformers 5's fused 3-D expert parameters into per-expert ``nn.Linear`` modules
before tuning (``auto_round.modeling.fused_moe``); the worker still checks that every linear the driver
expects (attention, every routed expert, shared experts) came back quantized and fails loudly if not.

    python benchmarks/peer_autoround_worker.py JOB.json
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch


def calibration_batches(ids: torch.Tensor) -> list[dict]:
    """One dict per calibration window: auto-round runs one forward per element and batches the cached
    block inputs itself. An all-ones mask: no padding, the same causal attention moeq calibrates with."""
    return [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in ids]  # (1, T) each


def dequantized(lin: torch.nn.Linear, bits: int, group_size: int) -> tuple[torch.Tensor, float]:
    """(float32 weight (q - zp) * scale, largest distance of weight / scale + zp from an integer).

    After ``quantize()`` auto-round holds each quantized linear's fake-quantized weight in its tuning dtype
    (bf16 on CPU), its ``scale`` (fp16, one per group) and ``zp`` (2^(bits-1) for symmetric grids). The
    integers are recovered from those and the weight rebuilt in float32, which is what a dequantizing
    kernel of an exported auto-round/GPTQ checkpoint computes; the distance shows the weight was on the grid.
    """
    w = lin.weight.detach().float()  # (out, in)
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group_size, group_size)  # (out, groups, group)
    scale = lin.scale.detach().float().reshape(out_f, -1, 1)  # (out, groups, 1)
    zp = lin.zp.detach().float().reshape(out_f, -1, 1) if torch.is_tensor(lin.zp) else float(lin.zp)
    x = torch.where(scale == 0, torch.zeros_like(g), g / scale.where(scale != 0, torch.ones_like(scale))) + zp
    q = x.round().clamp(0, 2 ** bits - 1)  # (out, groups, group) unsigned integers
    residual = float((x - q).abs().max())
    return ((q - zp) * scale).reshape(out_f, in_f), residual


def distinct_per_group(w: torch.Tensor, group_size: int) -> int:
    """Largest number of distinct values in one group of ``group_size`` consecutive input columns."""
    s = w.reshape(w.shape[0], -1, group_size).sort(-1).values  # (out, groups, group)
    return int((1 + (s[..., 1:] != s[..., :-1]).sum(-1)).max())


def run(job: dict) -> dict:
    from auto_round import AutoRound
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(job["threads"])
    out = Path(job["out"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(job["model_path"])
    ids = load_file(job["calib_ids"])["ids"]  # (n, T) long, the driver's calibration windows
    fp = {name: {"bits": 16} for name in job["fp_modules"]}  # routers, shared-expert gates, lm_head
    ar = AutoRound(model, tok, scheme=f"W{job['bits']}A16", group_size=job["group_size"], sym=job["sym"],
                   dataset=calibration_batches(ids), nsamples=ids.shape[0], seqlen=ids.shape[1], iters=job["iters"],
                   seed=job["seed"], device_map="cpu", layer_config=fp, enable_torch_compile=job["compile"])
    t = time.perf_counter()
    qmodel, layer_config = ar.quantize()
    quant_seconds = time.perf_counter() - t

    mods = dict(qmodel.named_modules())
    quantized = sorted(n for n, m in mods.items() if isinstance(m, torch.nn.Linear) and hasattr(m, "scale"))
    missing = sorted(set(job["expected_linears"]) - set(quantized))
    if missing:
        raise SystemExit(f"auto-round left {len(missing)} of {len(job['expected_linears'])} expected linears "
                         f"unquantized (e.g. {missing[:3]}); experts must not be skipped")
    wrongly = sorted(set(job["fp_modules"]) & set(quantized))
    if wrongly:
        raise SystemExit(f"auto-round quantized modules that must stay in full precision: {wrongly}")
    weights, residual, distinct = {}, 0.0, 0
    for name in quantized:
        w, r = dequantized(mods[name], job["bits"], job["group_size"])
        weights[f"{name}.weight"] = w.contiguous()
        residual, distinct = max(residual, r), max(distinct, distinct_per_group(w, job["group_size"]))
    if residual > 0.25 or distinct > 2 ** job["bits"]:
        raise SystemExit(f"auto-round weights are not on their {job['bits']}-bit grid: integer residual "
                         f"{residual:.3f}, up to {distinct} distinct values per group")
    save_file(weights, str(out / "weights.safetensors"))
    return meta(job, ar, layer_config, quantized, residual, distinct, quant_seconds, time.perf_counter() - t0)


def meta(job, ar, layer_config, quantized, residual, distinct, quant_seconds, total_seconds) -> dict:
    """What the driver records: times, versions, the settings auto-round resolved, verification counts."""
    import auto_round
    import transformers

    qc = ar.quantize_config
    schemes = {(c.get("bits"), c.get("group_size"), c.get("sym"), c.get("data_type"))
               for n, c in layer_config.items() if n in set(quantized)}
    settings = {k: getattr(qc, k, None) for k in (
        "iters", "lr", "minmax_lr", "momentum", "nblocks", "enable_minmax_tuning", "enable_norm_bias_tuning",
        "enable_quanted_input", "gradient_accumulate_steps", "not_use_best_mse", "enable_alg_ext", "enable_adam")}
    calib, ctx = ar.calibration_context, ar.model_context
    settings.update(batch_size=calib.batch_size, nsamples=calib.nsamples, seqlen=calib.seqlen, seed=job["seed"],
                    amp=ctx.amp, amp_dtype=str(ctx.amp_dtype), enable_torch_compile=bool(ar.enable_torch_compile),
                    experts_implementation=getattr(ctx.model.config, "_experts_implementation", None),
                    schemes=sorted([list(map(str, s)) for s in schemes]))
    n_expert = sum(".experts." in n for n in quantized)
    return {"quant_seconds": quant_seconds, "worker_seconds": total_seconds, "settings": settings,
            "quantized_linears": len(quantized), "quantized_expert_linears": n_expert,
            "max_integer_residual": residual, "max_distinct_per_group": distinct,
            "env": {"auto_round": auto_round.__version__, "torch": torch.__version__,
                    "transformers": transformers.__version__, "python": platform.python_version(),
                    "threads": torch.get_num_threads()}}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    result = run(job)
    (Path(job["out"]) / "meta.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
