"""Calibration token windows: ``nsamples`` random ``seqlen``-token windows of a text source, seeded.

Documents are joined with the source's separator into one stream (WikiText-2 lines with "\\n\\n",
like the papers), tokenized once, and windows start at positions drawn with ``random.Random(seed)``,
so the same arguments always give the same token ids. A ``.jsonl`` file with ``input_ids`` rows
(what ``moeq calib ebss`` writes) is used as is; any other file is text (:mod:`.files`).
The caller's tokenizer is not modified.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import is_jsonl, jsonl_rows
from .sources import load_text

MAX_CHARS = 8_000_000  # tokenize at most this much text (enough for 1000s of 2048-token windows)


@dataclass
class CalibSet:
    ids: torch.Tensor  # (n, seqlen) long
    source: str
    origin: str
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"source": self.source, "origin": self.origin, "nsamples": int(self.ids.shape[0]),
                "seqlen": int(self.ids.shape[1]), "tokens": int(self.ids.numel()), "notes": self.notes}


def _token_rows(path: Path) -> list[list[int]] | None:
    """Rows of token ids when ``path`` is a jsonl whose first row carries ``input_ids``; else None."""
    if not (is_jsonl(path) and path.is_file()):
        return None
    rows = jsonl_rows(path)
    first = next(rows, None)
    if first is None or not isinstance(first[1], dict) or "input_ids" not in first[1]:
        return None
    out = []
    for n, r in [first, *rows]:
        if not isinstance(r, dict) or "input_ids" not in r:
            raise ValueError(f'{path}, line {n}: no "input_ids" field, but the first line has one; a token-id '
                             'file (moeq calib ebss) needs it on every line')
        out.append(r["input_ids"])
    return out


def token_rows_length(source: str) -> int | None:
    """Length of the shortest row when ``source`` is a jsonl of token ids (``moeq calib ebss``); else None."""
    rows = _token_rows(Path(source).expanduser())
    return min(len(r) for r in rows) if rows else None


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0,
                        data_dir=None) -> CalibSet:
    if nsamples < 1:
        raise ValueError("the calibration set would be empty: --nsamples must be >= 1")
    rows = _token_rows(Path(source).expanduser())
    if rows is not None:
        rows = [r[:seqlen] for r in rows if len(r) >= seqlen][:nsamples]
        if not rows:
            raise ValueError(f"{source} has no token row of at least seqlen={seqlen} tokens")
        return CalibSet(torch.tensor(rows), Path(source).name, str(source))
    src = load_text(source, data_dir=data_dir, purpose="calib")
    text = src.joined()[:MAX_CHARS]
    if not text.strip():
        raise ValueError(f"calibration source {source!r} is empty")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # one call: no length warning
    if len(ids) <= seqlen:
        raise ValueError(f"calibration text {source!r} has {len(ids)} tokens, not more than seqlen={seqlen}; "
                         "use a shorter --seqlen or a larger source")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return CalibSet(torch.tensor([ids[s:s + seqlen] for s in starts]), src.name, src.origin, list(src.notes))
