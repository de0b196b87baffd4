"""The small MoE language models moeq ships and trained itself (see scripts/train_bundled_model.py).

Each lives in ``moeq/bundled/<name>/`` as a standard HF checkpoint with a MODEL_CARD.md; a bundled
name is accepted wherever a MODEL argument is.
"""

from __future__ import annotations

import json
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"
DEFAULT_MODEL = "qwen2-moe-tiny"


def bundled_names() -> list[str]:
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())


def bundled_path(name: str) -> Path | None:
    p = BUNDLED_DIR / name
    return p if name in bundled_names() else None


def describe(name: str) -> dict:
    """name, path, architecture, model_type, parameters, default flag."""
    p = BUNDLED_DIR / name
    cfg = json.loads((p / "config.json").read_text())
    params = None
    log = p / "train_log.json"
    if log.is_file():
        params = json.loads(log.read_text()).get("params")
    if params is None:
        from safetensors import safe_open

        with safe_open(str(p / "model.safetensors"), "pt") as f:
            params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"name": name, "path": str(p), "architecture": (cfg.get("architectures") or ["?"])[0],
            "model_type": cfg["model_type"], "parameters": params, "default": name == DEFAULT_MODEL}


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
