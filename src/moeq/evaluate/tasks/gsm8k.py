"""GSM8K helpers: gold answers, answer extraction from a chain-of-thought generation, lm-eval filters.

The extraction reproduces lm-eval's ``regex`` filter with the patterns of its ``gsm8k_cot`` task:

* ``strict-match``: the number in the first "The answer is N." (the exemplars' closing sentence);
* ``flexible-extract``: the last number-like token anywhere in the generation.

A generation with no match gives ``"[invalid]"``. The ``exact_match`` metric then compares with the
gold number after removing "," "$" a trailing "." and anything up to "#### " (the harness's settings).
"""

from __future__ import annotations

import re

INVALID = "[invalid]"
STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def gold_answer(answer: str) -> str:
    """GSM8K ``answer`` field ("...reasoning...\\n#### 72") -> "72"."""
    return answer.split("####")[-1].strip()


def doc_to_target(doc: dict) -> str:
    """Test documents: the gold number; few-shot exemplars ({question, target}): their reasoning."""
    return gold_answer(doc["answer"]) if doc.get("answer") is not None else doc["target"]


def _regex_extract(pattern: re.Pattern, text: str, group_select: int) -> str:
    matches = pattern.findall(text if isinstance(text, str) else "")
    if not matches:
        return INVALID
    m = matches[group_select]
    if isinstance(m, tuple):  # several groups: the first non-empty one
        m = next((g for g in m if g), INVALID)
    return m.strip()


def extract_answer(text: str, strict: bool = True) -> str:
    """The model's final answer in a generation, as lm-eval's gsm8k_cot filters extract it."""
    return _regex_extract(STRICT, text, 0) if strict else _regex_extract(FLEXIBLE, text, -1)


def strict_filter(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval ``custom`` filter: per document, the list of responses -> extracted answers."""
    return [[extract_answer(r, strict=True) for r in rs] for rs in resps]


def flexible_filter(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[extract_answer(r, strict=False) for r in rs] for rs in resps]
