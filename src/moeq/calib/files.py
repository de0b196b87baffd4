"""Documents from a user's file: every existing file is text, read by its extension.

* ``.jsonl``: one JSON object per line, its ``"text"`` field is a document (a line may also be a bare
  JSON string). Blank lines are skipped.
* ``.json``: a list of such rows, or an object holding them: an object with a ``"text"`` field is one
  row; otherwise its single list-valued field is the list of rows (``{"data": [...]}``, ``{"rows": [...]}``).
  An object with several list fields is refused, since which one holds the text is ambiguous.
* ``.parquet``: the ``"text"`` column (pyarrow, imported only here).
* anything else (``.txt``, ``.raw``, no extension, ...): the whole file is one UTF-8 document.
* a trailing ``.gz`` is decompressed first, then the rules above apply to the inner name
  (``.jsonl.gz``, ``.txt.gz``).

Every problem (binary or non-UTF-8 content, broken JSON, a row without ``"text"``, no text at all) is a
one-line ``ValueError`` naming the file (and line), the problem and the fix.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

FORMATS = ('a UTF-8 text file (.txt, .raw or any other name), a .jsonl/.json with a "text" field per row, '
           'or a .parquet with a "text" column')


def _kind(path: Path) -> tuple[str, bool]:
    """(format, gzipped): format is "jsonl", "json", "parquet" or "text"."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    inner = suffixes[-2] if gz and len(suffixes) > 1 else (suffixes[-1] if suffixes and not gz else "")
    return {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(inner, "text"), gz


def is_jsonl(path: Path) -> bool:
    return _kind(path)[0] == "jsonl"


def _not_text(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path} is not a text file ({problem}); use {FORMATS}")


def _read_bytes(path: Path, gz: bool) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise _not_text(path, f"not a readable gzip file: {e}") from None


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text with universal newlines (as ``open(path, "rt")`` reads it)."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise _not_text(path, f"binary data: a NUL byte at offset {nul}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_text(path, f"not valid UTF-8 at byte offset {e.start}; convert it to UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: Path) -> str:
    """The whole file (gunzipped when it ends in .gz) as UTF-8 text; a clear error for binary content."""
    return _decode(path, _read_bytes(path, _kind(path)[1]))


def jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for every non-blank line, parsed lazily (a caller may stop after the first)."""
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg}); each line of a .jsonl must be one "
                                 f'JSON object such as {{"text": "..."}}') from None


def _json_rows(path: Path) -> list[tuple[str, object]]:
    """(where, row) pairs of a .json file (see the module docstring for the accepted layouts)."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file or use a .jsonl "
                         "with one object per line") from None
    if isinstance(data, dict) and "text" not in data:
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path}: a .json must hold a list of rows or an object with exactly one list of rows "
                             f"(found {len(lists)} list fields{': ' + ', '.join(lists) if lists else ''}); "
                             'write the rows as a list of {"text": "..."} objects')
        return [(f"{lists[0]}[{i}]", r) for i, r in enumerate(data[lists[0]])]
    rows = data if isinstance(data, list) else [data]
    return [(f"row {i}", r) for i, r in enumerate(rows)]


def _text_of(path: Path, where: str, row: object) -> str:
    """The document of one JSON row: a bare string, or an object's "text" string."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict) or "text" not in row:
        found = f"fields: {', '.join(map(str, row))}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
        raise ValueError(f'{path}, {where}: no "text" field ({found}); every row must be an object with a "text" '
                         'string (a .jsonl of "input_ids" rows is only usable as --calib token ids)')
    if not isinstance(row["text"], str):
        raise ValueError(f'{path}, {where}: "text" is a {type(row["text"]).__name__}, not a string')
    return row["text"]


def _parquet_docs(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not a readable parquet file ({first}); use {FORMATS}") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise ValueError(f'{path}: no "text" column (columns: {", ".join(names)}); rename the text column to "text"')
    col = pf.read(columns=["text"]).column("text").to_pylist()
    return [_text_of(path, f"row {i}", v) for i, v in enumerate(col) if v is not None]


def read_docs(path: Path) -> list[str]:
    """Non-empty documents of ``path`` by its format; a clear ValueError when there are none."""
    kind, _gz = _kind(path)
    if kind == "jsonl":
        docs = [_text_of(path, f"line {n}", r) for n, r in jsonl_rows(path)]
    elif kind == "json":
        docs = [_text_of(path, where, r) for where, r in _json_rows(path)]
    elif kind == "parquet":
        docs = _parquet_docs(path)
    else:
        docs = [read_text(path)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        what = "is empty or whitespace only" if kind == "text" else 'has no non-empty "text"'
        raise ValueError(f"{path} holds no text (it {what}); give it some text or use another --calib source")
    return docs
