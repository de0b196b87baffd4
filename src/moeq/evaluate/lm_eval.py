"""Downstream-task accuracy of an in-memory model through lm-evaluation-harness, fully offline.

``run_tasks(model, tokenizer, ["piqa", "mmlu", ...])`` wraps the model in lm-eval's ``HFLM`` and runs
``lm_eval.simple_evaluate`` over moeq's task definitions (``moeq.evaluate.tasks``: harness-equivalent
configs whose documents are read from the local data folder). Nothing is downloaded: task building
and evaluation run inside :func:`offline`, which sets ``HF_HUB_OFFLINE`` and friends (and the
module-level copies that ``huggingface_hub``, ``datasets`` and ``evaluate`` read at import) only for
that duration and restores the caller's environment exactly afterwards.

Settings: 0-shot except MMLU (5-shot from dev, first five) and GSM8K (8-shot chain of thought);
greedy generation; metrics under the harness's names: acc, acc_norm (hellaswag, piqa, arc_*,
openbookqa, mathqa), exact_match (gsm8k), pass@1 (humaneval), perplexity + acc (lambada).

Short contexts (e.g. the 512-token bundled model): a few-shot prompt that does not fit in the model's
context together with the longest answer choice (or the generation budget) is rebuilt with fewer
shots, one at a time, down to 0 - the shots kept are the ones the harness would use with that smaller
``num_fewshot`` (the first k for MMLU/GSM8K). Each task reports ``num_fewshot_used``, the mean number
of shots actually used, next to its metrics. A prompt still too long at 0 shots is truncated from
the left by lm-eval's HFLM. Generation budgets are capped at half the context (see the tasks
package docstring for this and the other deliberate differences from the harness).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import os
from typing import Any, Iterator

from moeq.evaluate.tasks import TASKS, available_tasks, task_configs, task_options

__all__ = ["available_tasks", "build_task", "run_tasks"]


OFFLINE_ENV = dict.fromkeys(
    ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"), "1")
# module-level copies of those variables, read once when the module is first imported (installed versions:
# huggingface_hub.constants, datasets.config, evaluate.config); the libraries consult these, not os.environ
OFFLINE_CONSTANTS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                     ("datasets.config", "HF_DATASETS_OFFLINE"), ("evaluate.config", "HF_EVALUATE_OFFLINE"))


def _restore_environ(saved: dict[str, str]) -> None:
    """Make os.environ equal ``saved`` again: variables added since are removed, changed ones reset."""
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, val in saved.items():
        if os.environ.get(key) != val:
            os.environ[key] = val


@contextlib.contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """os.environ with ``values`` set inside the block and exactly as before after it: variables that
    were unset are removed again, and so is anything a library set inside (lm_eval's import sets
    ``HF_XET_HIGH_PERFORMANCE``, torch._dynamo's ``TORCHINDUCTOR_CACHE_DIR``)."""
    saved = dict(os.environ)
    try:
        os.environ.update(values)
        yield
    finally:
        _restore_environ(saved)


def _offline_constants() -> list[tuple[Any, str]]:
    """(module, attribute) of every importable offline constant. The caller imports them before setting
    the offline variables, so a first import reads what it would read anyway and restoring is exact."""
    out = []
    for mod, attr in OFFLINE_CONSTANTS:
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, attr):
            out.append((m, attr))
    return out


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Nothing is downloaded inside the block: the offline variables are set (lm-eval, imported inside,
    sees them) and the libraries' already-read constants are switched on; both are restored on exit."""
    with scoped_env({}):  # the snapshot comes first: what the imports below set is undone as well
        saved = [(m, attr, getattr(m, attr)) for m, attr in _offline_constants()]
        os.environ.update(OFFLINE_ENV)
        try:
            for m, attr, _ in saved:
                setattr(m, attr, True)
            yield
        finally:
            for m, attr, val in reversed(saved):
                setattr(m, attr, val)


def _check_names(tasks, num_fewshot) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    names = list(dict.fromkeys(tasks))  # keep order, drop repeats
    unknown = [t for t in names if t not in TASKS] + [t for t in (num_fewshot or {}) if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; available: {', '.join(TASKS)}")
    if not names:
        raise ValueError(f"no tasks given; available: {', '.join(TASKS)}")
    return names


class _Fit:
    """Token counting against the model's context: ``count(text)``, ``max_length``."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, int(max_length)

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


@functools.cache
def _task_class():
    """``ConfigurableTask`` that drops few-shot examples until the prompt fits (built inside offline())."""
    from lm_eval.api.task import ConfigurableTask

    class MoeqTask(ConfigurableTask):
        moeq_fit: _Fit | None = None

        def _reserve(self, doc: dict) -> int:  # tokens the answer needs after the prompt
            fit, out = self.moeq_fit, self.OUTPUT_TYPE
            if out == "generate_until":
                return int((self.config.generation_kwargs or {}).get("max_gen_toks", 256))
            if out == "multiple_choice" and not self.multiple_input:
                delim = self.config.target_delimiter
                return max(fit.count(delim + c) for c in self.doc_to_choice(doc))
            target = self.doc_to_target(doc)
            return fit.count(target) if isinstance(target, str) else 1

        def fewshot_context(self, doc, num_fewshot, *args, **kwargs):
            ctx = super().fewshot_context(doc, num_fewshot, *args, **kwargs)
            if self.moeq_fit is None or num_fewshot <= 0 or not isinstance(ctx, str):
                return ctx
            budget = self.moeq_fit.max_length - self._reserve(doc) - 1  # 1: a BOS/prefix token
            n = num_fewshot
            while n > 0 and self.moeq_fit.count(ctx) > budget:
                n -= 1
                ctx = super().fewshot_context(doc, n, *args, **kwargs)
            self.__dict__.setdefault("moeq_shots", []).append(n)  # shots used, one entry per prompt
            return ctx

    return MoeqTask


def build_task(name: str, data_dir=None, tokenizer=None, max_length: int | None = None,
               num_fewshot: int | None = None) -> list:
    """lm-eval Task objects for one moeq task: one, or one per subject for MMLU. With ``tokenizer``
    and ``max_length`` few-shot prompts are fitted to that context (see the module docstring)."""
    fit = _Fit(tokenizer, max_length) if tokenizer is not None and max_length else None
    tasks = []
    with offline():
        cls = _task_class()
        for cfg in task_configs(name, data_dir, max_length, num_fewshot):
            task = cls(config=cfg)
            task.moeq_fit = fit
            tasks.append(task)
    return tasks


def _aggregate(parts: list[dict[str, float]], sizes: list[int], metrics: list[str]) -> dict[str, float]:
    """A group's metrics from its subtasks', as the harness aggregates ``weight_by_size`` groups:
    size-weighted mean, pooled standard error."""
    from lm_eval.api.metrics import pooled_sample_stderr

    out = {}
    for m in metrics:
        if all(m in p for p in parts) and sum(sizes):
            out[m] = sum(p[m] * n for p, n in zip(parts, sizes)) / sum(sizes)
        se = f"{m}_stderr"
        if all(se in p for p in parts) and sum(sizes) > len(sizes):
            out[se] = float(pooled_sample_stderr([p[se] for p in parts], sizes))
    return out


@contextlib.contextmanager
def _quiet_env() -> Iterator[None]:
    """Offline (see :func:`offline`); lm-eval logs a warning per task (57 for MMLU) about in-memory models
    and custom datasets: keep errors only while we run; compute bootstrap stderrs (perplexity)
    in-process, without a worker pool. Everything is restored on exit."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        with offline(), scoped_env({"DISABLE_MULTIPROC": "1"}):
            yield
    finally:
        logger.setLevel(level)


def _flatten(res: dict[str, Any], primary: str) -> dict[str, float]:
    """{"acc,none": .., "acc_stderr,none": .., "alias": ..} -> {"acc": .., "acc_stderr": ..}."""
    out = {}
    for key, val in res.items():
        if "," not in key or not isinstance(val, (int, float)):
            continue  # alias, sample_len, ...; "N/A" stderr values are dropped
        metric, filt = key.split(",", 1)
        out[metric if filt in ("none", primary) else key] = float(val)
    return out


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None,
              num_fewshot: dict[str, int] | None = None, batch_size: int = 8, data_dir=None,
              device=None) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` on moeq's offline tasks; {task: {metric: value}}.

    ``limit``: first N documents of each task (each MMLU subject). ``num_fewshot``: per-task override
    of the shot count. ``data_dir``: the data folder (default: $MOEQ_DATA_DIR, then ../shared/data).
    ``device``: move the model there first (in place); by default it stays where it is.
    Values: the metrics (``acc``, ``acc_stderr``, ``acc_norm``, ``exact_match``, ``pass@1``,
    ``perplexity`` ...), ``n_samples`` (documents scored), and for few-shot tasks
    ``num_fewshot_used`` (mean shots per prompt after fitting the context).
    ``humaneval`` executes the generated code (see ``moeq.evaluate.tasks.humaneval`` for the sandbox).
    """
    names = _check_names(tasks, num_fewshot)
    if device is not None:
        model.to(device)
    model.eval()
    if getattr(tokenizer, "pad_token_id", None) is None:  # HFLM would set one on the caller's tokenizer
        tokenizer = copy.deepcopy(tokenizer)
    with _quiet_env():
        try:  # first imported here, offline
            import lm_eval
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager
        except ImportError as e:
            raise ImportError(f"downstream tasks need lm-evaluation-harness: pip install 'moeq[eval]' ({e})") from e
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        built = {n: build_task(n, data_dir, lm.tokenizer, lm.max_length, (num_fewshot or {}).get(n)) for n in names}
        out = lm_eval.simple_evaluate(model=lm, tasks=[t for ts in built.values() for t in ts],
                                      task_manager=TaskManager(include_defaults=False), limit=limit,
                                      bootstrap_iters=200, log_samples=False, confirm_run_unsafe_code=True)
    results = {}
    for name, subtasks in built.items():
        opts = task_options(name)
        primary = opts.get("moeq_primary_filter", "none")
        parts = [_flatten(out["results"][t.task_name], primary) for t in subtasks]
        sizes = [int(out["n-samples"][t.task_name]["effective"]) for t in subtasks]
        res = parts[0] if len(parts) == 1 else _aggregate(parts, sizes, opts.get("moeq_group_metrics", ["acc"]))
        res["n_samples"] = sum(sizes)
        shots = [n for t in subtasks for n in getattr(t, "moeq_shots", [])]
        if shots:
            res["num_fewshot_used"] = sum(shots) / len(shots)
        results[name] = res
    return results
