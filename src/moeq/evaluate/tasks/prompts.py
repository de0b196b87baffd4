"""Prompt helpers the task YAMLs reference with ``!function prompts.<name>``.

They reproduce, line for line, the helpers of lm-evaluation-harness 0.4.x
(``lm_eval/tasks/{hellaswag,super_glue/copa,winogrande,mathqa}/utils.py``, MIT licence), so a moeq
task builds the same prompt strings and continuations as the harness task of the same name.
Documents are the harness-schema dicts produced by ``moeq.evaluate.tasks.loaders``.
"""

from __future__ import annotations

import re


# --------------------------------------------------------------------------- hellaswag
def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # brackets are artifacts of the WikiHow part of HellaSwag
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_doc(doc: dict) -> dict:
    """Raw HellaSwag doc -> {query, choices[4], gold:int} (the harness's ``_process_doc``)."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in doc["endings"]],
            "gold": int(doc["label"])}


def hellaswag_process_docs(dataset):
    """``process_docs`` hook: datasets.Dataset -> Dataset with query/choices/gold columns added."""
    return dataset.map(hellaswag_doc)


# --------------------------------------------------------------------------- copa
def _lower_first(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def copa_doc_to_text(doc: dict) -> str:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"  # drop the premise's final period


def copa_doc_to_target(doc: dict) -> str:
    return " " + _lower_first(doc["choice1"] if doc["label"] == 0 else doc["choice2"])


def copa_doc_to_choice(doc: dict) -> list[str]:
    # the leading space is the harness's: with target_delimiter " " the continuation starts with two
    # spaces ("premise therefore" + "  the choice"); kept so scores match the harness's copa
    return [" " + _lower_first(doc["choice1"]), " " + _lower_first(doc["choice2"])]


# --------------------------------------------------------------------------- winogrande
def winogrande_doc_to_text(doc: dict) -> int:
    """Index of the correct context (multiple-input task: the contexts differ, the target is shared)."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


# --------------------------------------------------------------------------- mathqa
def mathqa_doc_to_choice(doc: dict) -> list[str]:
    """"a ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these" -> ["38", ..., "none of these"]."""
    return [c[4:].rstrip(" ,") for c in re.findall(r"[abcd] \) .*?, |e \) .*?$", doc["options"])]
