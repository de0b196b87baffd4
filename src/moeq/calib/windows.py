"""Calibration token windows: ``nsamples`` random ``seqlen``-token windows of a text source, seeded.

Documents are joined with the source's separator into one stream (WikiText-2 lines with "\\n\\n",
like the papers), tokenized once, and windows start at positions drawn with ``random.Random(seed)``,
so the same arguments always give the same token ids. A ``.jsonl`` file with ``input_ids`` rows
(what ``moeq calib ebss`` writes) is used as is.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
    """Rows of token ids when ``path`` is a jsonl whose lines carry ``input_ids``; else None."""
    if path.suffix != ".jsonl" or not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    if not first.strip() or "input_ids" not in json.loads(first):
        return None
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["input_ids"] for line in f if line.strip()]


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
    tokenizer.model_max_length = int(1e12)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= seqlen:
        raise ValueError(f"calibration text {source!r} has {len(ids)} tokens, not more than seqlen={seqlen}; "
                         "use a shorter --seqlen or a larger source")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return CalibSet(torch.tensor([ids[s:s + seqlen] for s in starts]), src.name, src.origin, list(src.notes))
