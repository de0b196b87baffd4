"""Output folders that never lose data: written to a temporary sibling, renamed into place at the end."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty output unless ``overwrite``; call before any heavy work."""
    if not str(out).strip():
        raise ValueError("--out is empty; give an output folder")
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputExistsError(f"{p} is a file, not a folder; choose another --out")
    _check_writable(p)
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise OutputExistsError(f"{p} already exists and is not empty; choose another --out or pass --overwrite")
    return p


def _check_writable(p: Path) -> None:
    """Fail now, not after hours of work, when the output's folder cannot be written (nothing is left behind)."""
    import tempfile

    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".moeq-probe-", dir=parent))
    except OSError as e:
        raise ValueError(f"cannot write the output {p}: {parent} is not writable ({e.strerror}); "
                                "choose another --out") from None


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename."""
    final = check_output(out, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file via a temporary sibling and an atomic rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(p)
