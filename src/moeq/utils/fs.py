"""Output folders that never lose data: written to a temporary sibling, renamed into place at the end."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


def cache_root() -> Path:
    """Where moeq caches what it can recompute (EBSS sets, FP figures): $MOEQ_CACHE or ~/.cache/moeq."""
    return Path(os.environ.get("MOEQ_CACHE", Path.home() / ".cache" / "moeq"))


def check_output(out: str | os.PathLike, overwrite: bool, marker: str | None = None) -> Path:
    """Refuse an existing output unless ``overwrite``, an output the process cannot write, and (with
    ``marker``, for folder outputs) a folder in the way that is a file or that moeq did not write (it lacks
    ``marker``, e.g. report.json): ``--overwrite`` replaces only moeq's own outputs. Call before any work."""
    if not str(out).strip():
        raise ValueError("--out is empty; give an output path")
    p = Path(out).expanduser()
    if marker is not None and p.exists() and not p.is_dir():
        raise OutputExistsError(f"{p} is a file, not a folder; choose another --out")
    probe_writable(nearest_existing(p), "--out", p)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        if not overwrite:
            raise OutputExistsError(f"{p} already exists; choose another --out or pass --overwrite")
        if marker is not None and not (p / marker).is_file():
            raise OutputExistsError(f"{p} is not a moeq output (it has no {marker}) and --overwrite only replaces "
                                    "folders moeq wrote; choose another --out or remove it yourself")
    return p


def nearest_existing(p: Path) -> Path:
    """The closest ancestor of ``p`` that exists (what a later mkdir -p starts from)."""
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def probe_writable(folder: Path, flag: str, target: Path) -> None:
    """Fail now, not after hours of work, when ``folder`` cannot be written: a temporary file is created and
    removed there (nothing is left behind); a file in the way or a refusal names ``flag``."""
    import tempfile

    if not folder.is_dir():
        raise ValueError(f"{flag} {target}: {folder} is a file, not a folder; choose another {flag}")
    try:
        fd, name = tempfile.mkstemp(prefix=".moeq-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ValueError(f"{flag} {target}: cannot write in {folder} ({e.strerror}); choose another {flag}") from None


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, marker: str | None = None):
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename."""
    final = check_output(out, overwrite, marker)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(final)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_siblings(final: Path) -> None:
    """Remove the ``.NAME.tmp-PID`` / ``.NAME.old-PID`` (and ``.NAME.tmp-HOST-PID``, a distributed rank's)
    siblings that runs killed before they finished left behind: their process, on this host, is gone. A live
    process's sibling, or another host's, is left alone."""
    import socket

    from .progress import log

    for stale in final.parent.glob(f".{final.name}.*-*"):
        kind, _, rest = stale.name[len(final.name) + 2:].partition("-")
        host, _, pid = rest.rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and host in ("", socket.gethostname()) and not _alive(int(pid)):
            log.warning("removing %s, left by an earlier run that was killed before it finished", stale)
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file via a temporary sibling and an atomic rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(p)
    tmp = p.parent / f".{p.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(p)
