"""Load a ``pack-quantized`` compressed-tensors checkpoint back as a dense model, exactly.

transformers can load these checkpoints too (and the round-trip test checks that it gives moeq's
logits), but its fused-expert path ignores zero points of asymmetric grids. moeq reads every grid:
the streaming reader (:class:`~moeq.models.checkpoint.CheckpointReader`) unpacks each linear with
compressed-tensors' own ``unpack_from_int32``, dequantizes (q - zero) * scale and rounds to the
checkpoint dtype (what any loader of the file computes); the model is assembled from its config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def is_packed_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors" and qc.get("format") == "pack-quantized"


def load_packed(path: str | Path, storage_dtype: torch.dtype, trust_remote_code: bool = False):
    """Dense model (storage dtype, CPU) whose quantized linears hold exactly (q - zero) * scale."""
    from ..models.lazy import CheckpointSource
    from ..models.loading import load_config

    cfg = load_config(str(path), trust_remote_code)
    src = CheckpointSource(str(path), cfg, storage_dtype, storage_dtype, "cpu", trust_remote_code)
    model = src.load_all()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model
