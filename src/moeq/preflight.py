"""Checks a command runs before any model work, so that bad input fails in seconds, writes nothing, and
says in one line which flag is wrong and how to fix it: output paths that can be written and are a file
or a folder as the flag expects, evaluation sets and tasks that exist, and lengths that fit the model's
context (read from its config, no weight loaded).
"""

from __future__ import annotations

import os
from pathlib import Path

from .utils.fs import OutputExistsError, nearest_existing, probe_writable


def _path(path, flag: str, kind: str) -> Path:
    if path is None or not str(path).strip():
        raise ValueError(f"{flag} is empty; give an output {kind}")
    return Path(path).expanduser()


def output_file(path, flag: str, overwrite: bool | None = None) -> Path:
    """A file the command will write: not a folder, in a writable folder. An existing file is refused unless
    ``overwrite`` (None: a results file such as --json, simply replaced)."""
    p = _path(path, flag, "file")
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a folder; give a file path")
    if p.exists() and overwrite is False:
        raise OutputExistsError(f"{p} already exists; choose another {flag} or pass --overwrite")
    probe_writable(nearest_existing(p), flag, p)
    return p


def output_folder(path, flag: str) -> Path:
    """A folder the command writes into and reuses (``moeq bench --out``): not a file, writable."""
    p = _path(path, flag, "folder")
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p} is a file, not a folder; choose another {flag}")
    probe_writable(p if p.is_dir() else nearest_existing(p), flag, p)
    return p


def check_apart(out, flag: str, inputs: dict[str, str | os.PathLike | None]) -> None:
    """``out`` is neither equal to, inside, nor around any input ({what: path}; None: absent), so that
    writing or replacing it can never destroy one."""
    o = Path(out).expanduser().resolve()
    for what, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        i = Path(path).resolve()
        if o == i or i in o.parents or o in i.parents:
            where = "is" if o == i else "is inside" if i in o.parents else "contains"
            raise ValueError(f"{flag} {out} {where} {what} ({path}); write the output somewhere else")


def check_data_dir(data_dir) -> None:
    """An explicit --data-dir (or $MOEQ_DATA_DIR) must exist."""
    from .calib.sources import data_root

    data_root(data_dir)


def check_ppl_sets(sets) -> None:
    from .evaluate.perplexity import WINDOWS

    unknown = [s for s in sets if s not in WINDOWS]
    if unknown:
        raise ValueError(f"--ppl: unknown perplexity set(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(WINDOWS)} (or none)")


def check_tasks(tasks, num_fewshot=None) -> None:
    from .evaluate.tasks import TASKS

    unknown = [t for t in (*tasks, *(num_fewshot or {})) if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(map(repr, unknown))}; available: {', '.join(TASKS)}")


def check_lengths(config, lengths: dict[str, int | None]) -> None:
    """Each given length ({flag: value}; None: unset) fits the context of the model ``config`` describes."""
    from .evaluate.perplexity import default_seqlen

    for flag, n in lengths.items():
        if n is not None:
            default_seqlen(config, n, flag)
