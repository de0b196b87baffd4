"""Readers for the local evaluation files: each returns documents in the schema of the Hugging Face
dataset that lm-evaluation-harness's builtin task of the same name reads, so moeq's task configs can
keep the harness's prompt templates unchanged.

Files are resolved at run time inside the data folder given by
``moeq.calib.sources.data_root(data_dir)`` (explicit dir -> ``$MOEQ_DATA_DIR`` -> ``../shared/data``
next to the repository); nothing is copied into the repository. A missing file raises
``TaskDataNotFoundError`` naming it.

Conversions (``D`` = one document, a plain dict):

* piqa       piqa/valid.jsonl + valid-labels.lst          -> D{goal, sol1, sol2, label:int}
* hellaswag  llama.cpp text, 6 lines per task               -> D{activity_label, ctx_a, ctx_b:"", endings[4], label:str}
* boolq      foundry {query:"Passage: P\\nQuestion: Q?", gold} -> D{passage, question (no "?"), label:int}
* copa       foundry {query:"<premise w/o final char>, therefore|because", choices[2], gold}
             -> D{premise (final "." restored), choice1, choice2, question:"effect"|"cause", label:int}
* openbookqa foundry {query, choices[4], gold}               -> D{question_stem, choices{text,label}, answerKey}
* winogrande foundry {context_options[2], continuation, gold}
             -> D{sentence ("prefix_ continuation"), option1, option2, answer:"1"|"2"}
* arc_*      foundry {query:"Question: Q", choices, gold}     -> D{question, choices{text, label:A..}, answerKey}
* lambada    foundry {context, continuation}                 -> D{text: context + " " + continuation}
* mmlu       headerless CSV (question, A, B, C, D, letter)    -> D{question, subject, choices[4], answer:int}
* mathqa     mathqa/test.json (original fields)              -> unchanged (Problem, options, correct, ...)
* gsm8k      gsm8k/test.jsonl                                -> D{question, answer ("... #### N")}
* humaneval  HumanEval.jsonl.gz                             -> D{task_id, prompt, canonical_solution, test, entry_point}

Reconstructions that cannot be exact (fields the harness prompt never reads, or reads only after a
transformation that erases the difference): copa's premise final punctuation and choice capitalisation
(the harness drops the former and lower-cases the first letter of the latter), ARC/OpenBookQA choice
labels (synthesised as A, B, C, ...; the prompt uses only the texts), the winogrande split of the two
contexts into a shared prefix and options (the contexts themselves are exact).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import os
from pathlib import Path

from moeq.calib.sources import DataNotFoundError, data_root

FOUNDRY = "llm_foundry_icl"
# task -> data files it needs (relative to the data folder)
FILES: dict[str, tuple[str, ...]] = {
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2",),
    "boolq": (f"{FOUNDRY}/reading_comprehension/boolq.jsonl",),
    "copa": (f"{FOUNDRY}/commonsense_reasoning/copa.jsonl",),
    "openbookqa": (f"{FOUNDRY}/commonsense_reasoning/openbook_qa.jsonl",),
    "winogrande": (f"{FOUNDRY}/language_understanding/winogrande.jsonl",),
    "arc_easy": (f"{FOUNDRY}/world_knowledge/arc_easy.jsonl",),
    "arc_challenge": (f"{FOUNDRY}/world_knowledge/arc_challenge.jsonl",),
    "lambada": (f"{FOUNDRY}/language_understanding/lambada_openai.jsonl",),
    "mmlu": ("mmlu/test", "mmlu/dev"),
    "mathqa": ("mathqa/test.json",),
    "gsm8k": ("gsm8k/test.jsonl",),
    "humaneval": ("humaneval/HumanEval.jsonl.gz",),
}


class TaskDataNotFoundError(DataNotFoundError):
    """A data file that an evaluation task needs is not in the data folder."""


def task_file(task: str, rel: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Absolute path of ``rel`` inside the resolved data folder, or a clear error."""
    root = data_root(data_dir)
    how = ("pass data_dir=DIR (CLI: --data-dir DIR), set MOEQ_DATA_DIR=DIR, or put the moeq data folder "
           "(shared/data) beside the repository")
    if root is None:
        raise TaskDataNotFoundError(f"task {task!r} needs the data file {rel!r} but no data folder was found: {how}")
    p = root / rel
    if not p.exists():
        raise TaskDataNotFoundError(f"task {task!r} needs the data file {rel!r}, which is missing from {root} "
                                    f"(looked for {p}): {how}")
    return p


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


# --------------------------------------------------------------------------- per-task readers
def load_piqa(data_dir=None) -> list[dict]:
    rows = _jsonl(task_file("piqa", FILES["piqa"][0], data_dir))
    labels = task_file("piqa", FILES["piqa"][1], data_dir).read_text().split()
    if len(labels) != len(rows):
        raise ValueError(f"piqa: {len(rows)} questions but {len(labels)} labels")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(lab)}
            for r, lab in zip(rows, labels)]


def load_hellaswag(data_dir=None) -> list[dict]:
    path = task_file("hellaswag", FILES["hellaswag"][0], data_dir)
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    n = len(lines) // 6  # 6 lines per task; the file ends with one empty line
    docs = []
    for i in range(n):
        head, label, *endings = lines[6 * i: 6 * i + 6]
        activity, _, ctx = head.partition(": ")
        # ctx is the original ctx_a + " " + ctx_b; ctx_b cannot be recovered, see the package docstring
        docs.append({"activity_label": activity, "ctx_a": ctx, "ctx_b": "", "endings": endings, "label": label})
    return docs


def load_boolq(data_dir=None) -> list[dict]:
    docs = []
    for r in _jsonl(task_file("boolq", FILES["boolq"][0], data_dir)):
        passage, _, question = r["query"].removeprefix("Passage: ").rpartition("\nQuestion: ")
        docs.append({"passage": passage, "question": question.removesuffix("?"), "label": int(r["gold"])})
    return docs


def load_copa(data_dir=None) -> list[dict]:
    docs = []
    for r in _jsonl(task_file("copa", FILES["copa"][0], data_dir)):
        stem, _, connector = r["query"].rpartition(" ")
        question = {"therefore": "effect", "because": "cause"}[connector]
        # foundry wrote premise[:-1] + ", " + connector; the harness's prompt has no comma
        docs.append({"premise": stem.removesuffix(",") + ".", "choice1": r["choices"][0], "choice2": r["choices"][1],
                     "question": question, "label": int(r["gold"])})
    return docs


def _mc_with_labels(rows: list[dict], key: str, strip: str = "") -> list[dict]:
    docs = []
    for r in rows:
        labels = _letters(len(r["choices"]))
        docs.append({key: r["query"].removeprefix(strip), "choices": {"text": list(r["choices"]), "label": labels},
                     "answerKey": labels[int(r["gold"])]})
    return docs


def load_openbookqa(data_dir=None) -> list[dict]:
    return _mc_with_labels(_jsonl(task_file("openbookqa", FILES["openbookqa"][0], data_dir)), "question_stem")


def load_arc(name: str, data_dir=None) -> list[dict]:
    return _mc_with_labels(_jsonl(task_file(name, FILES[name][0], data_dir)), "question", "Question: ")


def load_winogrande(data_dir=None) -> list[dict]:
    docs = []
    for r in _jsonl(task_file("winogrande", FILES["winogrande"][0], data_dir)):
        a, b = r["context_options"]
        cut = a.rfind(" ", 0, len(os.path.commonprefix([a, b]))) + 1  # shared prefix, up to a word boundary
        docs.append({"sentence": a[:cut] + "_ " + r["continuation"], "option1": a[cut:], "option2": b[cut:],
                     "answer": str(int(r["gold"]) + 1)})
    return docs


def load_lambada(data_dir=None) -> list[dict]:
    return [{"text": r["context"] + " " + r["continuation"]}
            for r in _jsonl(task_file("lambada", FILES["lambada"][0], data_dir))]


def mmlu_subjects(data_dir=None) -> list[str]:
    """The 57 subjects, sorted (from the test CSV file names)."""
    folder = task_file("mmlu", FILES["mmlu"][0], data_dir)
    return sorted(p.name.removesuffix("_test.csv") for p in folder.glob("*_test.csv"))


def load_mmlu(subject: str, split: str = "test", data_dir=None) -> list[dict]:
    """One subject's split ("test" or "dev"): D{question, subject, choices[4], answer: 0..3}."""
    path = task_file("mmlu", f"mmlu/{split}/{subject}_{split}.csv", data_dir)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return [{"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans.strip())}
            for q, a, b, c, d, ans in rows]


def load_mathqa(data_dir=None) -> list[dict]:
    with open(task_file("mathqa", FILES["mathqa"][0], data_dir), encoding="utf-8") as f:
        rows = json.load(f)
    return [{k: v for k, v in r.items() if k != "processed_options"} for r in rows]  # None values in that list


def load_gsm8k(split: str = "test", data_dir=None) -> list[dict]:
    return _jsonl(task_file("gsm8k", f"gsm8k/{split}.jsonl", data_dir))


def load_humaneval(data_dir=None) -> list[dict]:
    return _jsonl(task_file("humaneval", FILES["humaneval"][0], data_dir))


def load_docs(task: str, data_dir=None, subject: str | None = None) -> dict[str, list[dict]]:
    """Split name -> documents for one moeq task (``subject`` picks the MMLU subject)."""
    if task == "mmlu":
        if subject is None:
            raise ValueError("mmlu documents are loaded per subject: pass subject=")
        return {"test": load_mmlu(subject, "test", data_dir), "dev": load_mmlu(subject, "dev", data_dir)}
    if task in ("arc_easy", "arc_challenge"):
        return {"test": load_arc(task, data_dir)}
    readers = {"piqa": load_piqa, "hellaswag": load_hellaswag, "boolq": load_boolq, "copa": load_copa,
               "openbookqa": load_openbookqa, "winogrande": load_winogrande, "lambada": load_lambada,
               "mathqa": load_mathqa, "gsm8k": load_gsm8k, "humaneval": load_humaneval}
    if task not in readers:
        raise ValueError(f"no loader for task {task!r}")
    return {"test": readers[task](data_dir=data_dir)}
