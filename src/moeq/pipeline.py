"""The whole flow of ``moeq quantize``, top to bottom; it calls stage functions and holds no algorithm.

open the checkpoint (config only) -> resolve the method (registry) -> resident or streamed ->
(FP evaluation) -> calibration ids -> the one block loop: every block is read from the shards,
transformed, searched, solved, written out and checkpointed, then freed -> head -> shards, config,
report -> (quantized evaluation) -> the output folder renamed into place.

*Resident*: when the quantized model is wanted in memory afterwards (evaluation, ``return_model``,
W*A* fake quant) and fits ``max_memory``, every block stays in memory (the FP model is evaluated first).
*Streamed*: otherwise blocks are freed as soon as they are written, and perplexity is computed block
by block (:mod:`moeq.evaluate.streamed`); peak memory is then about one block plus the activations.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import __version__
from .calib.windows import CalibSet
from .calib.make import make_calibration, run_calibration
from .capture.activations import Activations
from .capture.quantize import MethodRun, export_blocker
from .capture.solve import default_budget
from .config import QuantConfig
from .evaluate.perplexity import default_seqlen, evaluate_ppl
from .evaluate.report import build_report, dumps
from .export.compressed_tensors import bf16_size_bytes, write_config
from .export.containers import run_storage, stored_bits, widened_count
from .export.formats import check_formats, drop_compressed_tensors, finish_formats, ggml_grid
from .export.partial import PartialRun, model_fingerprint
from .export.writer import PartWriter
from .methods import fp_stream_needed, needs_calibration, resolve_config
from .models.adapter import ModelAdapter
from .models.lazy import CheckpointSource, ResidentSource, module_bytes
from .models.loading import Loaded, compute_dtype, load_tokenizer, open_checkpoint
from .utils.device import fits_on_device, peak_memory_mb, resolve_device
from .utils.dist import Dist
from .preflight import check_apart
from .calib.sources import data_root
from .utils.fs import check_output, remove_stale_siblings
from .utils.memory import fmt_bytes, free_bytes
from .utils.progress import log
from .stream import LoopResult, embeddings_and_inputs, head, placement, quantize_blocks, resumed_transforms


@dataclass(frozen=True)
class RunOptions:
    """How a run uses memory and disk. None of these change a result."""

    max_memory: int | None = None  # bytes the whole model may take to stay in memory; None: half the free RAM
    offload_activations: str = "auto"  # auto | device | cpu | disk
    max_solve_memory: int | None = None  # bytes for one group's statistics + batched solve (capture.solve default)
    max_shard_size: int = 5 * 10**9
    resume: bool = False
    fp_cache: bool = True  # reuse the FP figures of an earlier run on the same model and settings
    kill_after_block: int | None = None  # test hook: send this process ``kill_signal`` once block N is checkpointed
    kill_signal: int = signal.SIGKILL
    dist: Dist = Dist()  # several ranks (torchrun): data-parallel calibration, expert-parallel solves
    formats: tuple[str, ...] = ("compressed-tensors",)  # what --out holds: compressed-tensors and/or gguf
    gguf_pre: str | None = None  # llama.cpp pre-tokenizer name when moeq cannot tell it


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


def check_plan(adapter: ModelAdapter, cfg: QuantConfig, serving: bool = True) -> None:
    """Fail before any heavy work when a planned grid does not fit a linear or the plan names modules
    the model lacks; warn when fused serving kernels could not run the plan (``serving``: False for a
    GGUF-only output, where every llama.cpp tensor has its own type)."""
    from .allocate.modules import plan_warnings

    linears = adapter.linears()
    for li, args in zip(linears, cfg.plan.resolve([li.name for li in linears]).values()):
        if args is not None:
            args.check_width(adapter.module(li.name).in_features, li.name)
    unknown = sorted(set(cfg.plan.overrides) - {li.name for li in linears})
    if unknown:
        raise ValueError(f"the plan names {len(unknown)} linears this model does not have (e.g. {unknown[0]}); "
                         "was it made for another model? Rebuild it with `moeq plan MODEL`")
    for msg in plan_warnings(cfg.plan, adapter) if serving and (cfg.plan.overrides or cfg.plan.rules) else []:
        log.warning(msg)


def evaluate(model, tokenizer, ev: EvalSpec, data_dir=None, windows: dict | None = None, label: str = "",
             dist: Dist = Dist()) -> dict:
    """Perplexities and task metrics of one in-memory model: {"wikitext2": {...}, ..., "tasks": {...}}."""
    out = evaluate_ppl(model, tokenizer, ev.ppl, ev.seqlen, data_dir, windows, label=label, limit=ev.ppl_limit,
                       dist=dist)
    if ev.tasks:
        from .evaluate.lm_eval import run_tasks

        out["tasks"] = run_tasks(model, tokenizer, list(ev.tasks), ev.limit, ev.num_fewshot, ev.task_batch_size,
                                 data_dir)
    return out


@dataclass
class Quantized:
    """An in-memory quantized model and what the block loop recorded."""

    model: torch.nn.Module
    adapter: ModelAdapter
    loop: LoopResult
    calib: CalibSet | None
    seconds: dict
    method: MethodRun | None = None  # transforms artefact, hooks (W*A*), notes


# ---------------------------------------------------------------------------------------------- quantize
def quantize(model: str | None, cfg: QuantConfig, out: str | Path | None, *, device: str = "auto",
             evals: EvalSpec = EvalSpec(), skip_eval: bool = False, overwrite: bool = False, data_dir=None,
             trust_remote_code: bool = False, return_model: bool = False, options: RunOptions = RunOptions()):
    """Quantize ``model`` with ``cfg``; write the checkpoint and report.json to ``out``.

    Returns the report, or (report, in-memory quantized model) with ``return_model``."""
    t_start = time.perf_counter()
    secs = {"load": 0.0, "calibration": 0.0, "quantize": 0.0, "evaluate": 0.0, "export": 0.0}
    dist = options.dist
    if dist.enabled:
        _check_distributed(cfg, evals, skip_eval)
    device = resolve_device(device)
    info = open_checkpoint(model, trust_remote_code)  # the config only
    if out is not None and str(out).strip():  # before anything is written (even a writability probe)
        check_apart(out, "--out", {"the model being quantized": info.path, "the data folder": data_root(data_dir),
                                   "the calibration file": cfg.calib.source})
    out_path = check_output(out, overwrite and not options.resume, "report.json") if out is not None else None
    cfg, method_notes = resolve_config(cfg, is_moe=info.spec.moe is not None)
    if out_path is not None and "gguf" in options.formats:
        cfg = replace(cfg, plan=cfg.plan.mapped(ggml_grid))
    dtype = compute_dtype(device, info.storage_dtype)
    t = time.perf_counter()
    source = CheckpointSource(info.path, info.config, dtype, info.storage_dtype, device, trust_remote_code)
    adapter = source.adapter
    if source.reader.packed:
        method_notes.append(f"{info.path} is already quantized (compressed-tensors pack-quantized): its dequantized "
                            "weights were quantized again, so both rounding errors add up")
        log.warning(method_notes[-1])
    elif source.reader.fp8_block:
        method_notes.append("block-FP8 source: weights dequantized block by block as they were read")
    check_plan(adapter, cfg, serving=out_path is None or "compressed-tensors" in options.formats)
    storage = None
    if out_path is not None and export_blocker(cfg) is None:  # how each unit is stored; refused before any work
        resolved = cfg.plan.resolve([li.name for li in adapter.linears()])
        check_formats(options.formats, info, options.gguf_pre, resolved)
        storage, records = run_storage(adapter, resolved, options.formats)
    tokenizer = load_tokenizer(info.path, trust_remote_code)
    secs["load"] += time.perf_counter() - t
    wanted = not skip_eval or return_model or cfg.act is not None
    size, budget = module_bytes(source.model, dtype), options.max_memory or free_bytes("cpu") // 2
    resident = wanted and size <= budget
    if wanted and not resident:
        _refuse_streamed(evals, skip_eval, return_model, cfg, size, budget, out_path is not None)
    log.info("model: %s in %s; %s", fmt_bytes(size), str(dtype).replace("torch.", ""),
             "kept in memory" if resident else "streamed block by block from its shards")

    fingerprint = {"moeq": __version__, "model": model_fingerprint(info.path), "quant": cfg.to_dict(),
                   "formats": list(options.formats),  # how finished blocks were stored depends on them
                   **({"ranks": dist.world} if dist.enabled else {})}  # the batches a rank holds depend on it
    partial = PartialRun(out_path, fingerprint, options.resume, overwrite) if out_path is not None and dist.main \
        else None
    if out_path is not None:
        remove_stale_siblings(out_path)
    with partial if partial is not None else contextlib.nullcontext():
        start = partial.resumed_from or 0 if partial is not None else 0
        state = partial.state if partial is not None else {}
        # rank 0's partial run decides for every rank; the others keep their activations in it too
        start, state, pdir = dist.broadcast((start, state, str(partial.dir) if partial is not None else None))
        rank_dir = Path(pdir) / f"acts-rank{dist.rank}" if pdir and not dist.main else None
        if start and fp_stream_needed(cfg):
            raise ValueError(f"this --method {cfg.method} run cannot resume: the FP activation stream it carries "
                             "(GPTAQ, blocktune's asymmetric targets) is not checkpointed; pass --overwrite to start over")
        if start and cfg.act is not None:
            raise ValueError("a W*A* fake-quant run cannot resume (its evaluation needs every block in memory); "
                             "pass --overwrite to start over")
        model_obj = None
        if resident:
            t = time.perf_counter()
            model_obj = source.load_all()
            if fits_on_device(model_obj, device):
                model_obj.to(device)  # otherwise blocks are onloaded one at a time by the loop
            secs["load"] += time.perf_counter() - t
        metrics, windows = {}, {}
        if not skip_eval:
            t = time.perf_counter()
            metrics["fp"] = state.get("fp_metrics") or _fp_metrics(
                info.path, {"evals": asdict(evals), "dtype": str(dtype), "device": torch.device(device).type,
                            "streamed": not resident, "data_dir": str(data_dir)}, options, method_notes,
                lambda: _evaluate(model_obj, source, tokenizer, evals, data_dir, windows, "FP", options, partial))
            if partial is not None:
                partial.commit(fp_metrics=metrics["fp"], num_blocks=adapter.num_blocks)
            secs["evaluate"] += time.perf_counter() - t
        fp_copy = copy.deepcopy(model_obj) if evals.fidelity and not skip_eval else None

        def whole_model():  # EBSS generation needs the whole model, once, before the streamed loop
            if size > budget:
                raise ValueError(
                    f"EBSS makes the model write its calibration set, which needs the whole model in memory "
                    f"({fmt_bytes(size)}, more than the budget of {fmt_bytes(budget)}): generate the set where it fits "
                    "(`moeq calib ebss MODEL --out set.jsonl`) and pass it with --calib set.jsonl")
            return model_obj or CheckpointSource(info.path, info.config, dtype, info.storage_dtype, device,
                                                 trust_remote_code).load_all()
        t = time.perf_counter()
        calib = run_calibration(partial, whole_model, source.model, tokenizer, info.path, cfg, data_dir, device,
                                dist) if needs_calibration(cfg) else None
        secs["calibration"] = time.perf_counter() - t

        t = time.perf_counter()
        run = MethodRun(adapter, cfg, info.storage_dtype, options.max_solve_memory, dist)
        run.notes += method_notes
        loop = LoopResult()
        writer = PartWriter(partial.dir, options.max_shard_size) if partial is not None else None
        loop_source = ResidentSource(model_obj, device) if resident else source
        acts = None
        if start:
            if partial is not None:
                resumed_transforms(partial, run, start)
                writer.drop({"embed"} | {f"block-{i:05d}" for i in range(start)})
            loop.rows = state.get("rows", {})
            loop.expert_tokens = {int(k): v for k, v in state.get("expert_tokens", {}).items()}
            run.notes = state.get("notes", run.notes)
            if calib is not None:
                acts = Activations.load(partial.acts_dir if partial is not None else rank_dir, state["acts_gen"],
                                        placement(options, partial or rank_dir), device)
            log.info("resuming %s after block %d of %d", out, start, adapter.num_blocks)
        else:
            if partial is not None:
                partial.commit(num_blocks=adapter.num_blocks)
            acts = embeddings_and_inputs(source, run, calib, cfg, writer, options, partial, device, resident, dist,
                                         rank_dir)
        quantize_blocks(loop_source, run, acts, loop, keep=resident, start=start, writer=writer, partial=partial,
                        options=options, keep_results=writer is None and rank_dir is None, rank_dir=rank_dir,
                        storage=storage)
        head(source, run, writer, resident)
        run.attach_act_quant(list(loop.rows) if resident else [])
        if resident and not run.hooks:  # W*A* hooks sit on per-expert linears: keep that view
            adapter.refuse()  # the model's own (fused) forward for evaluation
        secs["quantize"] = time.perf_counter() - t

        rows = sorted(loop.rows.values(), key=lambda r: _natural(r["name"]))
        report = build_report(model or Path(info.path).name, info, source.model, adapter, cfg, calib, rows, loop,
                              metrics, run, device)
        report["memory"] = {"mode": "resident" if resident else "streamed", "model_bytes": size, "budget_bytes": budget,
                            "activations": acts.placement if acts is not None else None,
                            "activation_bytes": acts.nbytes if acts is not None else 0,
                            "max_solve_memory": options.max_solve_memory or default_budget(device),
                            "max_shard_size": options.max_shard_size, "resumed_from_block": start or None}
        blocker = export_blocker(cfg)
        if blocker:
            report["notes"].append(blocker)
        if partial is not None:
            t = time.perf_counter()
            if run.transforms:
                run.transforms.save(partial.dir / "transforms.safetensors")  # re-appliable search results
            if blocker is None:
                files = writer.finish(["embed"] + [f"block-{i:05d}" for i in range(adapter.num_blocks)] + ["head"])
                write_config(partial.dir, adapter, storage, info.storage_dtype, cfg.act, tokenizer, info.path)
                report["size"] = {"checkpoint_bytes": files["bytes"], "bf16_bytes": bf16_size_bytes(adapter),
                                  "files": files["files"], "stored_avg_bits": round(stored_bits(records, storage), 4)}
                report.update(finish_formats(partial.dir, options.formats, str(out), report["notes"],
                                             widened_count(run.plan, storage), report["size"]["stored_avg_bits"],
                                             options.gguf_pre, trust_remote_code))
            else:
                writer.finish([])
            secs["export"] = time.perf_counter() - t
        if resident and start:  # blocks an earlier process finished are only on disk: read the result back
            dist.barrier()  # rank 0 has written it
            model_obj = CheckpointSource(pdir, _reloaded_config(Path(pdir), trust_remote_code), dtype,
                                         info.storage_dtype, "cpu", trust_remote_code).load_all()
        if not skip_eval:
            t = time.perf_counter()
            qmodel = model_obj
            dist.barrier()  # rank 0 has written the checkpoint
            qsource = None if resident else CheckpointSource(pdir, _reloaded_config(
                Path(pdir), trust_remote_code), dtype, info.storage_dtype, device, trust_remote_code)
            metrics["quantized"] = _evaluate(qmodel, qsource, tokenizer, evals, data_dir, windows,
                                             cfg.plan.label(), options, partial)
            if fp_copy is not None:
                from .evaluate.fidelity import compare
                from .evaluate.perplexity import wikitext2_windows

                w = wikitext2_windows(tokenizer, default_seqlen(qmodel, evals.seqlen), data_dir).ids
                metrics["fidelity"] = compare(fp_copy, qmodel, w[: evals.ppl_limit or 64])
            secs["evaluate"] += time.perf_counter() - t
        secs["total"] = time.perf_counter() - t_start
        report["seconds"] = {k: round(v, 3) for k, v in secs.items()}
        report["peak_memory_mb"] = peak_memory_mb()
        if dist.enabled:
            report["distributed"] = _ranks_summary(dist, device, rows)
        if partial is not None:
            if "compressed-tensors" not in options.formats and blocker is None:
                drop_compressed_tensors(partial.dir)  # it served the evaluation and the GGUF conversion
            (partial.dir / "report.json").write_text(dumps(report))
            partial.finish()
            log.info("wrote %s", out)
    return (report, model_obj) if return_model else report


def _fp_metrics(model_dir: str, settings: dict, options: RunOptions, notes: list, compute) -> dict:
    """The FP figures: from the cache (same files, same settings) or ``compute()`` and cached."""
    from .evaluate import fp_cache

    settings["evals"].pop("fidelity", None)
    key = fp_cache.fp_key(model_dir, settings) if options.fp_cache else None
    cached = options.dist.broadcast(fp_cache.load(key) if key and options.dist.main else None)  # rank 0 decides
    if cached is not None:
        notes.append(f"FP figures reused from an earlier run with the same model files and evaluation settings "
                     f"({fp_cache.cache_root() / 'fp' / key}.json; --no-fp-cache recomputes them)")
        log.info("FP figures reused from the cache")
        return cached
    metrics = compute()
    if key and options.dist.main:
        fp_cache.store(key, metrics)
    return metrics


def _check_distributed(cfg: QuantConfig, evals: EvalSpec, skip_eval: bool) -> None:
    """What a run on several ranks cannot do yet is refused before any work, with the way to do it."""
    from .methods import single_process_reason

    why = single_process_reason(cfg.method)
    if why:
        raise ValueError(why)
    if not skip_eval and (evals.tasks or evals.fidelity):
        raise ValueError(f"{'--tasks' if evals.tasks else '--fidelity'} runs in one process only (lm-evaluation-harness "
                         "and the FP comparison drive one whole model): quantize under torchrun with --skip-eval or "
                         "perplexity only, then run `moeq eval OUT --tasks ... / --against MODEL` without torchrun")


def _ranks_summary(dist: Dist, device: str, rows: list[dict]) -> dict:
    """Per rank: device, peak memory, linears solved and their solve seconds (every rank's view, gathered)."""
    mine = [r for r in rows if r.get("rank") == dist.rank]
    ranks = dist.gather({"rank": dist.rank, "device": str(device), "peak_memory_mb": peak_memory_mb(),
                         "linears_solved": len(mine), "solve_seconds": round(sum(r["seconds"] for r in mine), 3)})
    return {"world_size": dist.world, "backend": dist.backend, "ranks": ranks}


def _refuse_streamed(evals: EvalSpec, skip_eval: bool, return_model: bool, cfg: QuantConfig, size: int,
                     budget: int, has_out: bool) -> None:
    """What needs the whole model in memory is refused up front for a model that must be streamed."""
    what = ("return_model" if return_model else "W*A* fake quantization (--act-bits)" if cfg.act is not None
            else "downstream tasks (--tasks)" if evals.tasks and not skip_eval
            else "--fidelity" if evals.fidelity and not skip_eval
            else "evaluating without an output folder (streamed evaluation reads the written checkpoint)"
            if not skip_eval and not has_out else None)
    if what:
        raise ValueError(f"the model takes {fmt_bytes(size)} in memory, more than the budget of {fmt_bytes(budget)}, "
                         f"so it is streamed block by block; {what} needs it whole. Raise --max-memory on a machine "
                         "with more RAM, or quantize with --skip-eval (perplexity is streamed) and evaluate the output "
                         "with `moeq eval OUT --tasks ...` where it fits")


def _evaluate(model, source, tokenizer, evals, data_dir, windows, label, options, partial) -> dict:
    """In memory when the model is resident, else streamed block by block (windows split over the ranks)."""
    if model is not None:
        return evaluate(model, tokenizer, evals, data_dir, windows, label, options.dist)
    from .evaluate.streamed import streamed_ppl

    folder = partial.dir / "eval-acts" if partial is not None else None
    seqlen = default_seqlen(source.model, evals.seqlen)
    return streamed_ppl(source, tokenizer, evals.ppl, seqlen, data_dir, windows, evals.ppl_limit, label,
                        options.offload_activations if folder is not None else "cpu", folder, options.dist)


def _reloaded_config(folder: Path, trust_remote_code: bool):
    from .models.loading import load_config

    return load_config(str(folder), trust_remote_code)


# ---------------------------------------------------------------------------------------------- in memory
def quantize_loaded(loaded: Loaded, cfg: QuantConfig, data_dir=None, device: str = "cpu",
                    copy_model: bool = True) -> Quantized:
    """Calibrate and quantize a model already in memory (a deep copy unless ``copy_model`` is False);
    nothing is written. The same loop and stages as :func:`quantize`."""
    m = copy.deepcopy(loaded.model) if copy_model else loaded.model
    adapter = ModelAdapter.for_model(m)
    cfg, notes = resolve_config(cfg, is_moe=adapter.spec.moe is not None)
    with adapter.per_expert():
        check_plan(adapter, cfg)
    t = time.perf_counter()
    calib = make_calibration(m, loaded.tokenizer, loaded.path, cfg, data_dir, device) if needs_calibration(cfg) else None
    t_cal = time.perf_counter() - t
    t = time.perf_counter()
    source = ResidentSource(m, device)
    run = MethodRun(source.adapter, cfg, loaded.storage_dtype)
    run.notes += notes
    acts = embeddings_and_inputs(source, run, calib, cfg, None, RunOptions(offload_activations="cpu"), None, device,
                                 resident=True)
    loop = LoopResult()
    quantize_blocks(source, run, acts, loop, keep=True, keep_results=True)
    head(source, run, None, resident=True)
    run.attach_act_quant(list(loop.rows))
    if not run.hooks:  # W*A* hooks sit on per-expert linears: keep that view
        source.adapter.refuse()
    return Quantized(m, source.adapter, loop, calib, {"calibration": t_cal, "quantize": time.perf_counter() - t}, run)


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]
