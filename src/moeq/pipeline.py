"""The whole flow of ``moeq quantize``, top to bottom; it calls stage functions and holds no algorithm.

load -> bind the architecture -> (FP perplexity) -> per-expert view -> calibration windows ->
block loop (solve every linear) -> export compressed-tensors -> (quantized perplexity) -> report.
The output folder is assembled in a temporary sibling and renamed into place at the end.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .calib.ebss import EBSSConfig, ebss_calibration
from .calib.windows import CalibSet, calibration_windows
from .capture.sequential import LoopResult, quantize_model
from .methods import MethodRun, after_loop, before_loop, export_blocker
from .config import QuantConfig
from .evaluate.perplexity import default_seqlen, evaluate_ppl
from .evaluate.report import SCHEMA_VERSION, bit_stats, dumps
from .export.compressed_tensors import bf16_size_bytes, save_checkpoint
from .models.adapter import ModelAdapter
from .models.loading import Loaded, load_model
from .utils.device import fits_on_device, peak_memory_mb, resolve_device
from .utils.fs import atomic_dir, check_output
from .utils.progress import log


def check_plan(adapter: ModelAdapter, cfg: QuantConfig) -> None:
    """Fail before any heavy work when a planned grid does not fit a linear or the plan names modules
    the model lacks; warn when fused serving kernels could not run the plan."""
    from .allocate.modules import plan_warnings

    linears = adapter.linears()
    for li in linears:
        args = cfg.plan.args_for(li.name)
        if args is not None:
            args.check_width(adapter.module(li.name).in_features, li.name)
    unknown = sorted(set(cfg.plan.overrides) - {li.name for li in linears})
    if unknown:
        raise ValueError(f"the plan names {len(unknown)} linears this model does not have (e.g. {unknown[0]}); "
                         "was it made for another model? Rebuild it with `moeq plan MODEL`")
    for msg in plan_warnings(cfg.plan, adapter) if cfg.plan.overrides or cfg.plan.rules else []:
        log.warning(msg)


@dataclass(frozen=True)
class EvalSpec:
    """What to measure before and after quantization."""

    ppl: tuple[str, ...] = ("wikitext2",)
    seqlen: int | None = None  # None: min(2048, context)
    ppl_limit: int | None = None  # first N windows only (quick checks)
    tasks: tuple[str, ...] = ()  # lm-evaluation-harness tasks, offline
    limit: int | None = None  # first N examples per task
    num_fewshot: dict | None = None
    task_batch_size: int = 8
    fidelity: bool = False  # routing fidelity + KL against the FP model (keeps an FP copy)


def evaluate(model, tokenizer, ev: EvalSpec, data_dir=None, windows: dict | None = None, label: str = "") -> dict:
    """Perplexities and task metrics of one model: {"wikitext2": {...}, ..., "tasks": {...}}."""
    out = evaluate_ppl(model, tokenizer, ev.ppl, ev.seqlen, data_dir, windows, label=label, limit=ev.ppl_limit)
    if ev.tasks:
        from .evaluate.lm_eval import run_tasks

        out["tasks"] = run_tasks(model, tokenizer, list(ev.tasks), ev.limit, ev.num_fewshot, ev.task_batch_size,
                                 data_dir)
    return out


def quantize(model: str | None, cfg: QuantConfig, out: str | Path | None, *, device: str = "auto",
             evals: EvalSpec = EvalSpec(), skip_eval: bool = False, overwrite: bool = False, data_dir=None,
             trust_remote_code: bool = False, return_model: bool = False):
    """Quantize ``model`` with ``cfg``; write the checkpoint and report.json to ``out``.

    Returns the report, or (report, in-memory quantized model) with ``return_model``."""
    t_start = time.perf_counter()
    if out is not None:
        check_output(out, overwrite)
    device = resolve_device(device)
    secs = {"load": 0.0, "calibration": 0.0, "quantize": 0.0, "evaluate": 0.0, "export": 0.0}

    t = time.perf_counter()
    loaded = load_model(model, device=device, trust_remote_code=trust_remote_code)
    m, tok = loaded.model, loaded.tokenizer
    adapter = ModelAdapter.for_model(m)
    adapter.unfuse()
    check_plan(adapter, cfg)
    adapter.refuse()
    secs["load"] = time.perf_counter() - t
    if fits_on_device(m, device):
        m.to(device)  # otherwise blocks are onloaded one at a time by the block loop

    metrics, windows = {}, {}
    if not skip_eval:
        t = time.perf_counter()
        metrics["fp"] = evaluate(m, tok, evals, data_dir, windows, label="FP")
        secs["evaluate"] += time.perf_counter() - t

    fp_copy = copy.deepcopy(m) if evals.fidelity and not skip_eval else None
    q = quantize_loaded(loaded, cfg, data_dir, device, copy_model=False)
    calib, loop = q.calib, q.loop
    secs["calibration"], secs["quantize"] = q.seconds["calibration"], q.seconds["quantize"]

    rows = sorted(loop.rows.values(), key=lambda r: _natural(r["name"]))
    report = {
        "schema_version": SCHEMA_VERSION,
        "moeq_version": __version__,
        "model": {"name": model or Path(loaded.path).name, "path": loaded.path, "model_type": m.config.model_type,
                  "architecture": type(m).__name__, "params": adapter.param_count(),
                  "num_experts": adapter.num_experts, "top_k": adapter.top_k},
        "method": cfg.method,
        "quant_label": cfg.plan.label(),
        "quant": cfg.to_dict(),
        "calibration": calib.describe() if calib is not None else None,
        **bit_stats(rows),
        "modules": rows,
        "fallbacks": [{"name": r["name"], "policy": r["fallback"], "tokens": r["tokens"]}
                      for r in rows if r.get("fallback")],
        "expert_tokens": {str(k): v for k, v in loop.expert_tokens.items()},
        "full_precision": adapter.full_precision_modules(),
        "metrics": metrics,
        "notes": (list(calib.notes) if calib is not None else []) + q.method.notes,
        "transforms": q.method.transforms.describe(),
        "device": device,
    }

    def finish(tmp: Path | None):
        t = time.perf_counter()
        if tmp is not None and q.method.transforms:
            q.method.transforms.save(tmp / "transforms.safetensors")  # re-appliable search results
        if tmp is not None and export_blocker(cfg) is None:
            adapter.unfuse()  # export reads the per-expert view
            info = save_checkpoint(adapter, loop.results, tmp, loaded.storage_dtype, tok, act=cfg.act)
            report["size"] = {"checkpoint_bytes": info["bytes"], "bf16_bytes": bf16_size_bytes(adapter),
                              "files": info["files"]}
            if not q.method.needs_expert_view:
                adapter.refuse()  # the model's own (fused) forward for evaluation
        secs["export"] = time.perf_counter() - t
        if not skip_eval:
            t = time.perf_counter()
            metrics["quantized"] = evaluate(m, tok, evals, data_dir, windows, label=cfg.plan.label())
            if fp_copy is not None:
                from .evaluate.fidelity import compare
                from .evaluate.perplexity import wikitext2_windows

                w = wikitext2_windows(tok, default_seqlen(m, evals.seqlen), data_dir).ids[: evals.ppl_limit or 64]
                metrics["fidelity"] = compare(fp_copy, m, w)
            secs["evaluate"] += time.perf_counter() - t
        secs["total"] = time.perf_counter() - t_start
        report["seconds"] = {k: round(v, 3) for k, v in secs.items()}
        report["peak_memory_mb"] = peak_memory_mb()
        if tmp is not None:
            (tmp / "report.json").write_text(dumps(report))

    if out is None:
        finish(None)
    else:
        with atomic_dir(out, overwrite) as tmp:
            finish(tmp)
        log.info("wrote %s", out)
    return (report, m) if return_model else report


@dataclass
class Quantized:
    """An in-memory quantized model (experts re-fused) and what the block loop recorded."""

    model: torch.nn.Module
    adapter: ModelAdapter
    loop: LoopResult
    calib: CalibSet | None
    seconds: dict
    method: MethodRun | None = None  # transforms artefact, hooks (W*A*), notes


def quantize_loaded(loaded: Loaded, cfg: QuantConfig, data_dir=None, device: str = "cpu",
                    copy_model: bool = True) -> Quantized:
    """Calibrate and quantize a loaded model (a deep copy unless ``copy_model`` is False)."""
    m = copy.deepcopy(loaded.model) if copy_model else loaded.model
    adapter = ModelAdapter.for_model(m)
    t = time.perf_counter()
    calib = make_calibration(m, loaded.tokenizer, loaded.path, cfg, data_dir, device) if cfg.needs_calibration else None
    t_cal = time.perf_counter() - t
    adapter.unfuse()
    t = time.perf_counter()
    run = before_loop(adapter, cfg, loaded.storage_dtype)  # rotation / online Hadamard / AWQ or LWC stage
    loop = quantize_model(adapter, cfg, calib.ids if calib is not None else None, device, loaded.storage_dtype,
                          block_stage=run.stage)
    after_loop(adapter, cfg, run, list(loop.results), loaded.storage_dtype)
    t_q = time.perf_counter() - t
    if not run.needs_expert_view:  # W*A* hooks sit on per-expert linears: keep that view
        adapter.refuse()
    return Quantized(m, adapter, loop, calib, {"calibration": t_cal, "quantize": t_q}, run)


def make_calibration(model, tokenizer, model_path: str, cfg: QuantConfig, data_dir=None, device="cpu") -> CalibSet:
    """Calibration token ids: windows of a text source, or an EBSS set the model writes itself."""
    seqlen = default_seqlen(model, cfg.calib.seqlen)
    c = cfg.calib
    if c.source == "ebss":
        ecfg = EBSSConfig(num=c.nsamples, length=seqlen, width=c.ebss_width, tau=c.ebss_tau, seed=c.seed,
                           no_repeat_ngram=c.ebss_no_repeat_ngram)
        ids, info = ebss_calibration(model, tokenizer, model_path, ecfg, device)
        notes = [f"EBSS set {'reused from' if info['reused'] else 'generated and cached at'} {info['cache']}"]
        return CalibSet(ids, "ebss", info["cache"], notes)
    return calibration_windows(tokenizer, c.source, c.nsamples, seqlen, c.seed, data_dir)


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]
