"""HumanEval execution: run ``prompt + completion + test + check(entry_point)`` in a subprocess.

lm-eval's own humaneval task scores through Hugging Face ``evaluate``'s ``code_eval``, which is
fetched from the hub at import time; this module replaces it offline with the same procedure as
openai/human-eval: one program per problem, run in a fresh ``python -I`` process in an empty
temporary directory, killed (with its whole process group) after ``timeout`` seconds. The child runs
under resource limits (address space, CPU time, file size, no core dumps) and a
``reliability_guard``-style prelude that disables destructive and process-creating
``os``/``shutil``/``subprocess`` calls.
This guards against accidents, not against deliberately malicious code (the same caveat as
human-eval's): run untrusted models' code inside a container.

With greedy decoding (one sample per problem) pass@1 is the fraction of problems whose program exits
with status 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_TIMEOUT = 10.0  # seconds per problem (human-eval uses 3 s; more headroom on busy CPUs)

# runs before the program; mirrors human-eval's reliability_guard (minus what limits already cover)
_GUARD = """\
import builtins as _b, os as _os, shutil as _sh, subprocess as _sp, sys as _sys
_os.environ["OMP_NUM_THREADS"] = "1"
for _n in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
           "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
           "chmod", "chown", "chroot", "lchown", "chdir", "execv", "execve", "spawnv"):
    if hasattr(_os, _n):
        setattr(_os, _n, None)
_sh.rmtree = _sh.move = _sh.chown = None
_sp.Popen = None
_b.help = None
for _m in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    _sys.modules[_m] = None
del _b, _os, _sh, _sp, _sys, _n, _m
"""


def _limits(timeout: float):  # pragma: no cover - runs in the child between fork and exec
    def apply():
        try:
            import resource
        except ImportError:
            return
        gib = 1 << 30
        for lim, val in ((resource.RLIMIT_AS, 4 * gib), (resource.RLIMIT_DATA, 4 * gib),
                         (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_CPU, int(timeout) + 1),
                         (resource.RLIMIT_CORE, 0)):
            try:
                resource.setrlimit(lim, (val, val))
            except (ValueError, OSError):
                pass
    return apply


def build_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program human-eval runs: function + completion, the test module, then check(fn)."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def run_program(program: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    """Run ``program`` sandboxed; (passed, status) where status is "passed", "timed out" or the error tail."""
    with tempfile.TemporaryDirectory(prefix="moeq-humaneval-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(_GUARD + program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        kw = {"start_new_session": True, "preexec_fn": _limits(timeout)} if os.name == "posix" else {}
        proc = subprocess.Popen([sys.executable, "-I", "-B", str(path)], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return False, "timed out"
    if proc.returncode == 0:
        return True, "passed"
    tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    return False, tail[0]


def _kill(proc: subprocess.Popen) -> None:
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: only its processes
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    proc.communicate()


def check_completion(doc: dict, completion: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Does ``completion`` (the text generated after ``doc["prompt"]``) pass the problem's tests?"""
    return run_program(build_program(doc["prompt"], completion, doc["test"], doc["entry_point"]), timeout)[0]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results`` hook: one greedy completion -> {"pass@1": 0.0 | 1.0}."""
    return {"pass@1": float(check_completion(doc, results[0]))}
