"""``report.json``: the stable, documented record of a quantization run (schema in docs/report.md).

Scripts may rely on: ``schema_version``, ``model.*``, ``method``, ``quant``, ``avg_bits``,
``avg_bits_with_overhead``, ``modules[]`` (one row per quantized linear), ``fallbacks[]``,
``expert_tokens``, ``metrics.{fp,quantized}.{wikitext2,c4}.{ppl,bpb}``, ``size``, ``seconds.{load,
calibration,quantize,evaluate,export,total}``, ``peak_memory_mb`` and ``notes``. New keys may be added;
existing ones keep their meaning while ``schema_version`` stays 1.
"""

from __future__ import annotations

import json

SCHEMA_VERSION = 1


def build_report(name: str, info, model, adapter, cfg, calib, rows: list[dict], loop, metrics: dict, run,
                 device: str) -> dict:
    """The report of one run (everything but ``size``, ``memory``, ``seconds`` and ``peak_memory_mb``)."""
    from .. import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "moeq_version": __version__,
        "model": {"name": name, "path": info.path, "model_type": info.config.model_type,
                  "architecture": type(model).__name__, "params": adapter.param_count(),
                  "num_experts": adapter.num_experts, "top_k": adapter.top_k},
        "method": cfg.method,
        "quant_label": cfg.plan.label(),
        "quant": cfg.to_dict(),
        "calibration": calib.describe() if calib is not None else None,
        **bit_stats(rows),
        "modules": rows,
        "fallbacks": [{"name": r["name"], "policy": r["fallback"], "tokens": r["tokens"]}
                      for r in rows if r.get("fallback")],
        "expert_tokens": {str(k): v for k, v in sorted(loop.expert_tokens.items())},
        "full_precision": adapter.full_precision_modules(),
        "metrics": metrics,
        "notes": (list(calib.notes) if calib is not None else []) + run.notes,
        "transforms": run.transforms.describe(),
        "device": device,
    }


def bit_stats(rows: list[dict], scale_bits: int = 16) -> dict:
    """Average bits over the quantized linears: sum(bits x params) / sum(params), and the same
    including what each group and output row stores besides its integers (``group_bits``: a scale, and a zero
    point when asymmetric; K-quant grids their share of the super-block, :meth:`QuantArgs.group_bits`)."""
    params = sum(r["params"] for r in rows)
    if params == 0:
        return {"avg_bits": None, "avg_bits_with_overhead": None, "quantized_params": 0}
    bits = sum(r["bits"] * r["params"] for r in rows)
    overhead = 0
    for r in rows:
        out_rows = r["out_features"]
        groups = 1 if r["group_size"] == -1 else r["in_features"] // r["group_size"]
        overhead += out_rows * groups * r.get("group_bits", scale_bits + (0 if r["symmetric"] else r["bits"]))
    return {"avg_bits": bits / params, "avg_bits_with_overhead": (bits + overhead) / params,
            "quantized_params": params}


def format_table(report: dict) -> str:
    """A small plain-text table of the perplexities before and after."""
    m = report.get("metrics", {})
    fp, q = m.get("fp", {}), m.get("quantized", {})
    names = sorted(set(fp) | set(q))
    label = f"{report['method']} {report.get('quant_label', '')}".strip()
    lines = [f"{'dataset':<10} {'metric':<5} {'FP':>10} {label:>16} {'delta':>9}"]
    for n in names:
        for key in ("ppl", "bpb"):
            a, b = fp.get(n, {}).get(key), q.get(n, {}).get(key)
            fa = f"{a:10.3f}" if a is not None else f"{'-':>10}"
            fb = f"{b:16.3f}" if b is not None else f"{'-':>16}"
            d = f"{b - a:+9.3f}" if a is not None and b is not None else f"{'':>9}"
            lines.append(f"{n:<10} {key:<5} {fa} {fb} {d}")
    tf, tq = fp.get("tasks", {}), q.get("tasks", {})
    for t in sorted(set(tf) | set(tq)):
        key = _task_metric(tq.get(t) or tf.get(t))
        a, b = tf.get(t, {}).get(key), tq.get(t, {}).get(key)
        fa = f"{a:10.4f}" if a is not None else f"{'-':>10}"
        fb = f"{b:16.4f}" if b is not None else f"{'-':>16}"
        d = f"{b - a:+9.4f}" if a is not None and b is not None else f"{'':>9}"
        lines.append(f"{t[:10]:<10} {key[:5]:<5} {fa} {fb} {d}")
    ab = report.get("avg_bits")
    if ab is not None:
        lines.append(f"avg bits {ab:.3f} (with scales {report['avg_bits_with_overhead']:.3f}); "
                     f"time {report['seconds']['total']:.1f}s")
    return "\n".join(lines)


def _task_metric(res: dict) -> str:
    """The headline metric of a task result: acc_norm where reported, else acc, exact_match, pass@1."""
    for k in ("acc_norm", "acc", "exact_match", "pass@1"):
        if k in res:
            return k
    return next(iter(k for k in res if not k.endswith("_stderr")), "acc")


def format_tasks(tasks: dict) -> str:
    lines = [f"{'task':<14} {'metric':<12} {'value':>8} {'n':>6}"]
    for t, res in tasks.items():
        k = _task_metric(res)
        lines.append(f"{t:<14} {k:<12} {res[k]:8.4f} {int(res.get('n_samples', 0)):>6}")
    return "\n".join(lines)


def module_table(rows: list[dict]) -> str:
    """Per-module table for ``-v``."""
    head = f"{'module':<52} {'bits':>4} {'g':>5} {'tokens':>8} {'loss':>11} {'solver':>6} {'fallback':>11}"
    out = [head]
    for r in rows:
        loss = f"{r['loss']:.4g}" if r.get("loss") is not None else "-"
        out.append(f"{r['name']:<52} {r['bits']:>4} {r['group_size']:>5} {r.get('tokens') or 0:>8} {loss:>11} "
                   f"{r.get('solver', '-'):>6} {str(r.get('fallback') or ''):>11}")
    return "\n".join(out)


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str) + "\n"
