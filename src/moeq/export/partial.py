"""The output folder while a run is in progress, and resuming it: ``.OUT.partial`` beside ``--out OUT``.

Everything a run writes goes into the hidden sibling ``.OUT.partial``: the finished blocks' parts,
the calibration ids, the activations entering the next block and ``state.json`` (how many blocks
are done, the report rows so far, the settings' fingerprint). Each block ends by writing its part,
then the next block's inputs, then ``state.json`` (each through a temporary name and a rename), so a
run killed at any point (SIGKILL, OOM, reboot) leaves a consistent state of its last finished block.
Only a finished run renames the folder to ``OUT``: there is never a half-written ``OUT``.

``--resume`` continues from that state and refuses one made with other settings or another model
(the fingerprint: moeq version, model files, resolved quantization config). Without ``--resume`` an
existing partial run is refused (``--overwrite`` starts over). A lock file stops two processes from
writing the same folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from ..utils.fs import OutputExistsError

FORMAT = "moeq-partial"


class Interrupted(Exception):
    """Ctrl-C during a run whose partial state was kept; the message says how to resume."""


def model_fingerprint(path: str) -> dict:
    """What identifies a checkpoint's contents cheaply: its config and the weight files' names and sizes."""
    p = Path(path)
    files = sorted(f for f in p.glob("*") if f.suffix in (".safetensors", ".json") and f.is_file()
                   and not f.name.startswith("."))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
    return {"path": str(p.resolve()), "files": hashlib.sha256(h.digest()).hexdigest()[:16]}


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} -> {y!r}")
    return out


class PartialRun:
    """``with PartialRun(out, fingerprint, resume, overwrite) as run:`` ... ``run.finish()`` (see module doc)."""

    def __init__(self, out: str | os.PathLike, fingerprint: dict, resume: bool = False, overwrite: bool = False):
        self.out = Path(out).expanduser()
        self.dir = self.out.parent / f".{self.out.name}.partial"
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.resume, self.overwrite = resume, overwrite
        self.state: dict = {}
        self.resumed_from: int | None = None
        self._lock = None

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> "PartialRun":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()  # an existing folder: refuse at once if another process writes it
        state_file = self.dir / "state.json"
        if self.dir.exists() and state_file.is_file() and not self.overwrite:
            state = json.loads(state_file.read_text())
            done, n = state.get("blocks_done", 0), state.get("num_blocks", "?")
            if not self.resume:
                self._release()
                raise OutputExistsError(
                    f"{self.dir} holds an interrupted run of {self.out.name} ({done} of {n} blocks done); pass --resume "
                    "to continue it or --overwrite to start over")
            changed = _diff(state.get("fingerprint", {}), self.fingerprint)
            if changed:
                self._release()
                raise ValueError(f"the interrupted run in {self.dir} was made with other settings or another model "
                                 f"({'; '.join(changed[:4])}); rerun with its settings, or pass --overwrite to start over")
            self.state, self.resumed_from = state, done
        elif self.dir.exists():
            shutil.rmtree(self.dir)
            self._release()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        if not self.state:
            self.commit(format=FORMAT, version=1, fingerprint=self.fingerprint, blocks_done=0)
        return self

    def _take_lock(self) -> None:
        if self._lock is not None or not self.dir.exists():
            return
        f = open(self.dir / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise OutputExistsError(f"another moeq process is writing {self.out} (lock {self.dir / '.lock'}); "
                                    "wait for it to finish or stop it") from None
        self._lock = f

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __exit__(self, exc_type, exc, tb):
        self._release()
        if exc_type is None:
            return False
        done = self.state.get("blocks_done", 0)
        if done == 0 and not self.state.get("fp_metrics"):
            shutil.rmtree(self.dir, ignore_errors=True)  # nothing worth resuming
        if issubclass(exc_type, KeyboardInterrupt):
            if not self.dir.exists():
                raise Interrupted("interrupted before any block was done; nothing was written") from None
            raise Interrupted(f"interrupted after {done} of {self.state.get('num_blocks', '?')} blocks; the partial "
                              f"run is kept in {self.dir}: rerun the same command with --resume to continue it "
                              "(or --overwrite to start over)") from None
        return False

    # ------------------------------------------------------------------ state
    def commit(self, **updates) -> None:
        """Update ``state.json`` atomically."""
        self.state.update(updates)
        tmp = self.dir / ".state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1, default=str))
        tmp.replace(self.dir / "state.json")

    @property
    def acts_dir(self) -> Path:
        return self.dir / "acts"

    def finish(self) -> Path:
        """Drop the run state and rename the folder to OUT (replacing an old OUT only now)."""
        for p in ("state.json", ".lock"):
            (self.dir / p).unlink(missing_ok=True)
        for d in [self.dir / "acts", *self.dir.glob("acts-rank*")]:  # a distributed run's other ranks' too
            shutil.rmtree(d, ignore_errors=True)
        (self.dir / "calib.safetensors").unlink(missing_ok=True)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            self.out.rename(old)
        self.dir.rename(self.out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        return self.out
