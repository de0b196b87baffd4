"""Named text sources, offline first.

``wikitext2``, ``c4``, ``gsm8k``, ``humaneval`` or the path of any existing file, read as text by its
extension (:mod:`.files`: ``.jsonl`` / ``.json`` rows' ``text``, a ``.parquet`` ``text`` column, anything
else as plain UTF-8 text, ``.gz`` decompressed).
The data folder is resolved in this order (a named folder that does not exist is an error, not skipped):
an explicit ``data_dir`` -> ``$MOEQ_DATA_DIR`` ->
``../shared/data`` next to the repository (or the current directory) -> the Hugging Face hub through
``datasets`` when online -> a clear error saying how to provide the data.

Splits: evaluation reads WikiText-2 *test* and C4 *validation*; calibration reads WikiText-2 *train*
(absent offline: the validation split is used instead and a note says so) and C4 *train*. The two
never overlap, so no model is evaluated on text it was calibrated on.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .files import FORMATS, jsonl_rows, read_docs


class DataNotFoundError(FileNotFoundError):
    """No local copy and no hub access for a named source."""


@dataclass
class TextSource:
    name: str
    split: str
    docs: list[str]
    origin: str  # file path or hub id the text came from
    notes: list[str] = field(default_factory=list)
    joiner: str = "\n\n"  # how documents are joined into one stream

    def joined(self) -> str:
        return self.joiner.join(self.docs)


NAMED = ("wikitext2", "c4", "gsm8k", "humaneval")
# relative file per (name, split) inside the data folder
_FILES = {
    ("wikitext2", "test"): "wikitext2_raw/wiki.test.raw",
    ("wikitext2", "validation"): "wikitext2_raw/wiki.valid.raw",
    ("c4", "validation"): "c4/validation/c4_validation_shard0_first1025.jsonl",
    ("c4", "train"): "c4/train/c4_train_sample_1000.jsonl",
    ("gsm8k", "train"): "gsm8k/train.jsonl",
    ("gsm8k", "test"): "gsm8k/test.jsonl",
    ("humaneval", "test"): "humaneval/HumanEval.jsonl.gz",
}
# calibration split per source (the one never used for evaluation)
CALIB_SPLIT = {"wikitext2": "train", "c4": "train", "gsm8k": "train", "humaneval": "test"}
EVAL_SPLIT = {"wikitext2": "test", "c4": "validation"}
_HUB = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1"),
    "c4": ("allenai/c4", "en"),
    "gsm8k": ("openai/gsm8k", "main"),
    "humaneval": ("openai/openai_humaneval", None),
}


def _given(folder: str | os.PathLike, what: str) -> Path:
    """A data folder the user named: it must exist (never a silent fall-back to another folder)."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise DataNotFoundError(f"{what} {p} {'is not a folder' if p.exists() else 'does not exist'}; pass the moeq "
                                "data folder (shared/data), or leave it unset to use ../shared/data")
    return p


def _candidates(data_dir: str | os.PathLike | None) -> list[Path]:
    c = []
    if data_dir is not None and str(data_dir) != "":
        c.append(_given(data_dir, "--data-dir"))
    if os.environ.get("MOEQ_DATA_DIR"):
        c.append(_given(os.environ["MOEQ_DATA_DIR"], "$MOEQ_DATA_DIR"))
    repo = Path(__file__).resolve().parents[3]  # src/moeq/calib/sources.py -> repo root
    c += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    return c


def data_root(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first existing data folder in resolution order, or None; an explicit ``data_dir`` or
    ``$MOEQ_DATA_DIR`` that does not exist is an error."""
    for c in _candidates(data_dir):
        if c.is_dir():
            return c
    return None


def _docs_from_file(name: str, path: Path) -> list[str]:
    if name == "wikitext2":
        # the HF dataset's rows are the raw file's lines; the papers join them with "\n\n"
        return path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = [r for _, r in jsonl_rows(path)]
    if name == "gsm8k":
        return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    if name == "humaneval":
        return [r["prompt"] + r["canonical_solution"] for r in rows]
    return [r["text"] for r in rows]


def _from_hub(name: str, split: str) -> TextSource:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataNotFoundError("offline mode is set")
    if not _hub_reachable():  # fail fast when there is no network instead of waiting on retries
        raise DataNotFoundError("huggingface.co is unreachable")
    docs, origin = _hub_docs(name, split)
    return TextSource(name, split, docs, origin)


def _hub_docs(name: str, split: str) -> tuple[list[str], str]:
    """Documents of a named source's split through ``datasets``, and their origin."""
    try:
        import datasets  # optional dependency
    except ImportError as e:
        raise DataNotFoundError("the `datasets` package is not installed") from e
    repo, cfg = _HUB[name]
    if name == "c4":
        files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
        ds = datasets.load_dataset(repo, data_files={split: files[split]}, split=split)
    else:
        ds = datasets.load_dataset(repo, cfg, split=split)
    docs = ds["text"] if name in ("wikitext2", "c4") else (
        [f"Question: {q}\nAnswer: {a}" for q, a in zip(ds["question"], ds["answer"])] if name == "gsm8k"
        else [p + s for p, s in zip(ds["prompt"], ds["canonical_solution"])])
    return list(docs), f"hf://{repo}/{cfg or ''}:{split}"


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def load_text(name: str, split: str | None = None, data_dir: str | os.PathLike | None = None,
              purpose: str = "eval") -> TextSource:
    """Load a named source or a file. ``purpose`` picks the default split ("eval" or "calib")."""
    if name not in NAMED:
        p = Path(name).expanduser()
        if p.is_file():
            return TextSource(p.name, "file", read_docs(p), str(p))
        looks_like_path = bool(p.suffix) or os.sep in name or "/" in name
        raise ValueError(f"unknown text source {name!r}: use one of {', '.join(NAMED)} or the path of {FORMATS}"
                         + (" (that path is a directory)" if p.is_dir() else
                            " (that path does not exist)" if looks_like_path else ""))
    split = split or (EVAL_SPLIT.get(name) if purpose == "eval" else CALIB_SPLIT[name])
    if split is None:
        raise ValueError(f"{name} has no evaluation split in moeq; evaluate on wikitext2 or c4")
    notes = []
    if (name, split) == ("wikitext2", "train"):
        try:  # only the hub has it; used when the user is online
            return _from_hub(name, split)
        except Exception:  # noqa: BLE001
            notes.append("WikiText-2 train is not available offline; the validation split was used for calibration "
                         "(evaluation uses the test split, so calibration and evaluation text do not overlap)")
            split = "validation"
    rel = _FILES.get((name, split))
    tried = []
    for root in _candidates(data_dir):
        if rel and (root / rel).is_file():
            docs = _docs_from_file(name, root / rel)
            return TextSource(name, split, docs, str(root / rel), notes)
        tried.append(str(root / rel) if rel else str(root))
    try:
        return _from_hub(name, split)
    except Exception as e:  # noqa: BLE001 - any hub failure ends in the same actionable message
        raise DataNotFoundError(
            f"no data for {name}:{split}. Looked for: {', '.join(tried)}; Hugging Face hub: {e}. Put the moeq data "
            f"folder (shared/data) beside the repository, pass --data-dir DIR, or set MOEQ_DATA_DIR=DIR") from None

