"""``moeq bench``: a grid of quantization runs on one model, cached per cell, rendered as paper tables.

The grid is methods x bit widths x calibration sets (plus the FP row). Each cell's configuration is
hashed; its result is written to ``OUT/cells/<hash>.json`` as soon as it finishes, and a rerun skips
cells already there, so an interrupted bench resumes. At the end ``results.json``, ``results.md`` (the
layout of the MoEQuant paper's main table: WikiText-2 PPL, C4 PPL, each task, average accuracy),
``results.csv`` and plots (one bar chart per metric, perplexity vs bits) are written.
Every cell records wall time per stage (calibration incl. EBSS generation, quantization, evaluation)
and the peak resident memory sampled while it ran.
A grid (flags or a ``--grid`` YAML) is checked whole (methods, widths, group size, tasks, perplexity
sets, calibration sources, numbers, the model's config and context) before anything is written to OUT.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import BitPlan, CalibSpec, QuantConfig
from .methods import get_method, method_names
from .models.loading import load_model
from .pipeline import EvalSpec, evaluate, quantize_loaded
from .quant.primitives import QuantArgs
from .utils.fs import write_atomic
from .utils.progress import log

# every `moeq quantize --method` (the registry, moeq.methods), plus bench-only ablation variants
VARIANTS = {"gptq-agq": ("gptq", {"agq": True})}
BENCH_METHODS = (*method_names(), *VARIANTS)
# the type of each grid key: a type, a (type, None) pair for optional values, or [type] for lists
KINDS = {"model": (str, None), "methods": [str], "bits": [int], "group_size": int, "calib": [str], "nsamples": int,
         "seqlen": (int, None), "seed": int, "ppl": [str], "ppl_limit": (int, None), "tasks": [str],
         "limit": (int, None)}


def variant(method: str) -> tuple[str, dict]:
    """-> (the registered method, QuantConfig overrides of this bench variant)."""
    return VARIANTS.get(method, (method, {}))


@dataclass
class Grid:
    model: str | None = None
    methods: list[str] = field(default_factory=lambda: ["rtn", "gptq", "moequant"])
    bits: list[int] = field(default_factory=lambda: [4, 3])
    group_size: int = 128
    calib: list[str] = field(default_factory=lambda: ["wikitext2"])
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    ppl: list[str] = field(default_factory=lambda: ["wikitext2", "c4"])
    ppl_limit: int | None = None
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None

    def __post_init__(self):
        from .preflight import check_ppl_sets, check_tasks

        unknown = [m for m in self.methods if m not in BENCH_METHODS]
        if unknown:
            raise ValueError(f"unknown bench method(s) {unknown}; choose from {', '.join(BENCH_METHODS)}")
        for b in self.bits:
            QuantArgs(b, self.group_size)  # validates
        for key, least in (("nsamples", 1), ("seqlen", 2), ("ppl_limit", 1), ("limit", 1)):
            v = getattr(self, key)
            if v is not None and v < least:
                raise ValueError(f"{key} must be >= {least}, got {v}")
        check_ppl_sets(self.ppl)
        check_tasks(self.tasks)
        _check_calib(self.calib)

    @classmethod
    def from_yaml(cls, path) -> "Grid":
        data = _read_yaml(path)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"--grid {path}: unknown grid keys {sorted(unknown)}; allowed: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        for key, value in data.items():
            _check_kind(path, key, value, KINDS[key])
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"--grid {path}: {e}") from None

    def cells(self) -> list[dict]:
        out = [{"method": "fp", "bits": 16, "calib": None}]
        for method in self.methods:
            for bits in self.bits:
                m = get_method(variant(method)[0])
                fixed = m.calib == "ebss"  # EBSS methods bring their own calibration set
                cals = ["ebss"] if fixed else (self.calib if m.calib is not None else [None])
                out += [{"method": method, "bits": bits, "calib": c} for c in cals]
        return out


def _check_calib(sources: list[str]) -> None:
    from .calib.sources import NAMED

    bad = [c for c in sources if c not in (*NAMED, "ebss") and not Path(c).expanduser().is_file()]
    if bad:
        raise ValueError(f"calib: unknown calibration source(s) {bad}; use {', '.join(NAMED)}, ebss or the path of "
                         "a text file")


def _read_yaml(path) -> dict:
    """The mapping a --grid file holds; a missing, unreadable or malformed file is one error naming it."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"--grid {path} {'is a folder' if p.is_dir() else 'does not exist'}; give a YAML grid file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"--grid {path} is not UTF-8 text (byte offset {e.start}); give a YAML grid file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"--grid {path} is not valid YAML ({getattr(e, 'problem', None) or e}{where}); "
                         "fix the file (keys as the bench flags, e.g. `methods: [rtn, gptq]`)") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"--grid {path} must hold a mapping of grid keys (e.g. `bits: [4, 3]`), not a "
                         f"{type(data).__name__}")
    return data


def _is(value, t) -> bool:
    return isinstance(value, t) and not (t is int and isinstance(value, bool))


def _check_kind(path, key: str, value, kind) -> None:
    """``value`` has the type ``kind`` describes (see KINDS)."""
    if isinstance(kind, list):
        ok, what = isinstance(value, list) and all(_is(v, kind[0]) for v in value), f"a list of {kind[0].__name__}"
    elif isinstance(kind, tuple):
        ok, what = value is None or _is(value, kind[0]), f"{kind[0].__name__} or null"
    else:
        ok, what = _is(value, kind), kind.__name__
    if not ok:
        raise ValueError(f"--grid {path}: {key} must be {what}, got {value!r}")


def _quant_config(grid: Grid, cell: dict) -> QuantConfig:
    """The cell's config; the library fills in the method's defaults (calibration, AGQ, MSE clip, rotation)."""
    method, over = variant(cell["method"])
    return QuantConfig(method=method, plan=BitPlan(default=QuantArgs(cell["bits"], grid.group_size, True)),
                       calib=CalibSpec(cell["calib"], grid.nsamples, grid.seqlen, grid.seed), **over)


def cell_key(grid: Grid, cell: dict) -> str:
    cfg = {k: v for k, v in asdict(grid).items() if k not in ("methods", "bits", "calib")}
    blob = json.dumps({"grid": cfg, "cell": cell}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


class PeakRSS:
    """Samples this process's resident memory in a background thread (Linux /proc; else getrusage)."""

    def __init__(self, period: float = 0.2):
        self.period, self.peak, self._stop = period, 0.0, threading.Event()

    @staticmethod
    def current_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                import os

                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current_mb())
            self._stop.wait(self.period)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.current_mb())


def run_cell(loaded, grid: Grid, cell: dict, ev: EvalSpec, windows: dict, data_dir=None) -> dict:
    secs = {"calibration": 0.0, "quantize": 0.0, "evaluate": 0.0}
    with PeakRSS() as mem:
        model, avg = loaded.model, 16.0
        if cell["method"] != "fp":
            q = quantize_loaded(loaded, _quant_config(grid, cell), data_dir)
            model, secs["calibration"], secs["quantize"] = q.model, q.seconds["calibration"], q.seconds["quantize"]
            rows = list(q.loop.rows.values())
            avg = sum(r["bits"] * r["params"] for r in rows) / max(1, sum(r["params"] for r in rows))
        t = time.perf_counter()
        metrics = evaluate(model, loaded.tokenizer, ev, data_dir, windows)
        secs["evaluate"] = time.perf_counter() - t
    return {**cell, "avg_bits": avg, "metrics": metrics, "seconds": secs, "peak_rss_mb": round(mem.peak, 1)}


def check_model(grid: Grid, trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
    """The grid's model resolves to a supported checkpoint whose context holds --seqlen, whose weights match its
    config, and whose linears every cell's grid fits (headers and a meta skeleton only, no weight read)."""
    from .models.lazy import CheckpointSource
    from .models.loading import open_checkpoint, weight_files
    from .pipeline import check_plan
    from .preflight import check_lengths

    info = open_checkpoint(grid.model, trust_remote_code, allow_pickle)
    check_lengths(info.config, {"--seqlen": grid.seqlen})
    if not weight_files(info.path)[0]:  # a pickle checkpoint (--allow-pickle) has no headers to check
        return
    adapter = CheckpointSource(info.path, info.config, info.storage_dtype, info.storage_dtype, "cpu",
                               trust_remote_code).adapter
    for cell in grid.cells()[1:]:
        check_plan(adapter, _quant_config(grid, cell))


def run(grid: Grid, out: str | Path, data_dir=None, trust_remote_code: bool = False,
        allow_pickle: bool = False) -> list[dict]:
    out = Path(out)
    check_model(grid, trust_remote_code, allow_pickle)  # before anything is written to OUT
    (out / "cells").mkdir(parents=True, exist_ok=True)
    write_atomic(out / "grid.json", json.dumps(asdict(grid), indent=2) + "\n")
    ev = EvalSpec(ppl=tuple(grid.ppl), seqlen=grid.seqlen, ppl_limit=grid.ppl_limit, tasks=tuple(grid.tasks),
                  limit=grid.limit)
    loaded, windows, results = None, {}, []
    for cell in grid.cells():
        path = out / "cells" / f"{cell_key(grid, cell)}.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
            log.info("cached  %s", _label(cell))
            continue
        if loaded is None:
            loaded = load_model(grid.model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        log.info("running %s", _label(cell))
        res = run_cell(loaded, grid, cell, ev, windows, data_dir)
        write_atomic(path, json.dumps(res, indent=2) + "\n")
        results.append(res)
    write_outputs(results, grid, out)
    return results


def _label(cell: dict) -> str:
    return "FP" if cell["method"] == "fp" else f"{cell['method']} W{cell['bits']}" + (
        f" ({cell['calib']})" if cell["calib"] else "")


def _columns(results: list[dict], grid: Grid) -> list[tuple[str, str, str]]:
    """(header, path kind, key): ppl sets, then one headline metric per task."""
    from .evaluate.report import _task_metric

    cols = [(f"{p} PPL", "ppl", p) for p in grid.ppl]
    for t in grid.tasks:
        sample = next((r["metrics"]["tasks"][t] for r in results if t in r["metrics"].get("tasks", {})), {})
        cols.append((f"{t} {_task_metric(sample)}", "task", t))
    return cols


def _value(r: dict, kind: str, key: str):
    from .evaluate.report import _task_metric

    if kind == "ppl":
        return r["metrics"].get(key, {}).get("ppl")
    res = r["metrics"].get("tasks", {}).get(key)
    return res[_task_metric(res)] if res else None


def write_outputs(results: list[dict], grid: Grid, out: Path) -> None:
    cols = _columns(results, grid)
    rows = []
    for r in results:
        vals = [_value(r, kind, key) for _, kind, key in cols]
        accs = [v for (h, kind, _), v in zip(cols, vals) if kind == "task" and v is not None]
        rows.append([_label(r), r["bits"], round(r["avg_bits"], 3)] + vals +
                    [sum(accs) / len(accs) if accs else None, round(sum(r["seconds"].values()), 1), r["peak_rss_mb"]])
    header = ["method", "bits", "avg bits"] + [h for h, _, _ in cols] + ["avg acc", "seconds", "peak RSS MiB"]
    kinds = ["label", "int", "bits"] + [k for _, k, _ in cols] + ["task", "secs", "secs"]
    spec = {"ppl": "{:.3f}", "task": "{:.4f}", "bits": "{:.3f}", "secs": "{:.1f}", "int": "{}", "label": "{}"}
    fmt = lambda v, k: "-" if v is None else spec[k].format(v)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(fmt(v, k) for v, k in zip(row, kinds)) + " |" for row in rows]
    stages = ["", "| method | calibration s | quantize s | evaluate s | peak RSS MiB |", "|---|---|---|---|---|"]
    stages += [f"| {_label(r)} | {r['seconds']['calibration']:.1f} | {r['seconds']['quantize']:.1f} | "
               f"{r['seconds']['evaluate']:.1f} | {r['peak_rss_mb']:.0f} |" for r in results]
    write_atomic(out / "results.md", "\n".join(md + stages) + "\n")
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + rows)
    write_atomic(out / "results.csv", buf.getvalue())
    write_atomic(out / "results.json", json.dumps({"grid": asdict(grid), "cells": results}, indent=2) + "\n")
    from .evaluate.plots import bench_plots

    bench_plots(results, cols, out, _label, _value)
