"""The full-precision figures of a model, computed once: quantizing the same model again reuses them.

Every ``moeq quantize`` that evaluates starts with the FP model's perplexity (and tasks), which on small
models is most of the run. They depend only on the model's files and the evaluation settings, so they
are cached under ``<cache>/fp/<key>.json`` (the cache root is ``$MOEQ_CACHE`` or ``~/.cache/moeq``, as for
EBSS sets), keyed by the weight and config files' names, sizes and modification times, the evaluation
settings, the compute dtype and moeq's version. A changed file or setting is a different key; a cache that
cannot be read or written is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..utils.fs import cache_root


def fp_key(model_dir: str, settings: dict) -> str:
    """A key that changes with any weight or config file of ``model_dir`` and with ``settings``."""
    from .. import __version__

    h = hashlib.sha256()
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".bin"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps({"settings": settings, "moeq": __version__}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def load(key: str) -> dict | None:
    try:
        return json.loads((cache_root() / "fp" / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None


def store(key: str, metrics: dict) -> None:
    path = cache_root() / "fp" / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(metrics))
        tmp.replace(path)
    except OSError:
        pass
