"""moeq's downstream tasks for lm-evaluation-harness, defined offline over local data files.

Each task is a YAML file in this folder, written in lm-eval's task-config language and mirroring the
harness's builtin task of the same name (prompt template, choices, target, metrics, few-shot
setting). What differs is where the documents come from: instead of ``dataset_path`` (a hub id),
``task_configs`` injects a ``custom_dataset`` callable that reads the local file through
``loaders`` (documents in the harness's dataset schema). The data folder is only known at run time,
so configs are built in Python from the YAML, as plain dicts ready for ``lm_eval``.

YAML extensions (read here, removed before lm-eval sees the config):

* ``include: other.yaml``  - start from that file's settings (as in lm-eval);
* ``!function module.fn``  - a function of ``moeq.evaluate.tasks.<module>``;
* ``moeq_per_subject``     - MMLU: one subtask per subject (``mmlu_<subject>``), ``{subject}`` in the
  description filled in; ``moeq_group_metrics``: metrics the group aggregates (weighted by size);
* ``moeq_primary_filter``  - the filter whose metrics are reported under the bare metric name.

Deliberate differences from the harness (all forced by the local files or the offline setting):

* hellaswag: the llama.cpp text file stores ``ctx_a + " " + ctx_b`` joined, so the harness's
  ``ctx_b.capitalize()`` cannot be applied (e.g. "...on a roof. he" where the harness has "He"), and its
  WikiHow markup was stripped by llama.cpp's own code (the harness's clean-up is re-applied on top);
* gsm8k: "Question:/Answer:" layout with the 8 gsm8k_cot exemplars, "\\n\\n" as an extra stop;
* humaneval: scored by moeq's sandbox (``humaneval.py``), not HF evaluate's ``code_eval``;
* generation length is capped at half the model's context (``max_gen_toks``) when that is smaller;
* only evaluation splits exist locally, so a ``num_fewshot`` override on a 0-shot task draws its
  examples from the evaluation split (the evaluated document excluded), seeded as lm-eval seeds them.
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
from pathlib import Path
from typing import Any

import yaml

from . import loaders

HERE = Path(__file__).resolve().parent
# task names in report order; each has <name>.yaml here
TASKS = ("hellaswag", "piqa", "boolq", "copa", "openbookqa", "winogrande", "arc_easy", "arc_challenge",
         "mmlu", "mathqa", "gsm8k", "humaneval", "lambada")


def available_tasks() -> list[str]:
    return list(TASKS)


class _Loader(yaml.SafeLoader):
    pass


def _function(loader: yaml.SafeLoader, node: yaml.Node):
    module, _, name = loader.construct_scalar(node).rpartition(".")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


_Loader.add_constructor("!function", _function)


def load_yaml(name: str) -> dict[str, Any]:
    """The raw config of ``name`` (``include`` resolved, ``!function`` resolved to callables)."""
    path = HERE / (name if name.endswith(".yaml") else f"{name}.yaml")
    with open(path, encoding="utf-8") as f:
        cfg = yaml.load(f, Loader=_Loader)
    base = cfg.pop("include", None)
    return {**load_yaml(base), **cfg} if base else cfg


def _dataset(task: str, data_dir, subject: str | None = None, **_ignored):
    """lm-eval ``custom_dataset`` hook (called with the task's metadata, ignored): split -> Dataset."""
    import datasets  # imported late: the caller sets HF_DATASETS_OFFLINE first

    splits = loaders.load_docs(task, data_dir, subject)
    return {split: datasets.Dataset.from_list(docs) for split, docs in splits.items()}


def task_configs(name: str, data_dir: str | os.PathLike | None = None, max_length: int | None = None,
                 num_fewshot: int | None = None) -> list[dict[str, Any]]:
    """lm-eval config dicts for one moeq task: one dict, or one per subject for MMLU.

    ``max_length`` (the model's context) caps generation lengths at ``max_length // 2``;
    ``num_fewshot`` overrides the task's default. Data files are checked here, so a missing file
    fails before any model work.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    base = load_yaml(name)
    per_subject = base.pop("moeq_per_subject", False)
    for key in [k for k in base if k.startswith("moeq_")]:
        base.pop(key)
    if num_fewshot is not None:
        base["num_fewshot"] = int(num_fewshot)
    gen = base.get("generation_kwargs")
    if gen is not None and max_length:
        gen["max_gen_toks"] = max(1, min(int(gen.get("max_gen_toks", 256)), max_length // 2))
    for rel in loaders.FILES[name]:
        loaders.task_file(name, rel, data_dir)  # raises a clear error when missing
    if not per_subject:
        return [{**base, "custom_dataset": functools.partial(_dataset, name, data_dir)}]
    out = []
    for subject in loaders.mmlu_subjects(data_dir):
        cfg = copy.deepcopy(base)
        cfg.update(task=f"{name}_{subject}", task_alias=subject,
                   description=base["description"].format(subject=subject.replace("_", " ")),
                   custom_dataset=functools.partial(_dataset, name, data_dir, subject))
        out.append(cfg)
    return out


def task_options(name: str) -> dict[str, Any]:
    """moeq's own keys of a task's YAML (``moeq_*``), e.g. the group metrics or the primary filter."""
    return {k: v for k, v in load_yaml(name).items() if k.startswith("moeq_")}


__all__ = ["TASKS", "available_tasks", "load_yaml", "loaders", "task_configs", "task_options"]
