"""Resolve MODEL (bundled name, local checkpoint dir or hub id) and load it with clear errors.

Bundled models live in ``moeq/bundled/<name>/`` (see :mod:`moeq.models.bundled`). The architecture
is checked against the registry *before* weights are read, so an unsupported model fails at once
with the list of supported ``model_type`` values.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .bundled import DEFAULT_MODEL, bundled_path
from ..export.load import is_packed_checkpoint, load_packed
from .registry import get_spec


class CheckpointError(ValueError):
    """A MODEL argument that does not resolve to a readable checkpoint."""


def resolve_model(model: str | None) -> str:
    """Bundled name -> its directory; local dir -> itself; anything else is passed on as a hub id."""
    model = model or DEFAULT_MODEL
    p = bundled_path(model)
    if p is not None:
        return str(p)
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "config.json").is_file():
            raise CheckpointError(f"{local} is not a Hugging Face checkpoint directory (no config.json); "
                                  "pass a directory saved with save_pretrained, a bundled model name "
                                  "(see `moeq models`) or a hub id")
        return str(local)
    if model.count("/") > 1 or model.startswith((".", "/", "~")):
        raise CheckpointError(f"{model} does not exist; pass a checkpoint directory, a bundled model name "
                              "(see `moeq models`) or a hub id like Qwen/Qwen1.5-MoE-A2.7B")
    return model


def load_config(path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the config of {path!r}: {e}. If it is a hub id, this machine may be "
                              "offline: download the checkpoint elsewhere and pass its directory") from None


@dataclass
class CheckpointInfo:
    """What moeq knows of a checkpoint before reading any weight."""

    path: str  # local directory
    config: object  # transformers PretrainedConfig
    storage_dtype: torch.dtype  # dtype of its unquantized weights (scales and full-precision tensors are stored in it)

    @property
    def spec(self):
        return get_spec(self.config.model_type)


def local_path(model: str | None) -> str:
    """A local checkpoint directory for MODEL: bundled, local, or downloaded from the hub (fails fast offline)."""
    path = resolve_model(model)
    if Path(path).is_dir():
        return path
    from ..calib.sources import _hub_reachable

    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise CheckpointError(f"{model} is not a local checkpoint and the Hugging Face hub is not reachable (offline); "
                              "download it on a connected machine (`huggingface-cli download ID --local-dir DIR`) "
                              "and pass DIR")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"])
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same actionable message
        raise CheckpointError(f"cannot download {model} from the Hugging Face hub: {e}") from None


def open_checkpoint(model: str | None, trust_remote_code: bool = False) -> CheckpointInfo:
    """Resolve MODEL to a local directory and read its config (no weights); unknown architectures fail here."""
    path = local_path(model)
    cfg = load_config(path, trust_remote_code)
    get_spec(cfg.model_type)
    return CheckpointInfo(path, cfg, _as_dtype(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)))


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer of {path!r}: {e}") from None


def compute_dtype(device: str, storage_dtype: torch.dtype) -> torch.dtype:
    """fp32 on CPU (no fast bf16 matmuls there), the checkpoint's dtype on an accelerator."""
    return torch.float32 if str(device) == "cpu" else storage_dtype


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    path: str
    storage_dtype: torch.dtype  # dtype of the checkpoint's weights (scales are rounded to it)


def load_model(model: str | None = None, dtype: torch.dtype | str = "auto", device: str = "cpu",
               trust_remote_code: bool = False) -> Loaded:
    """Load model (eval mode) and tokenizer. dtype "auto": fp32 on CPU, the checkpoint's dtype on GPU."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(model)
    cfg = load_config(path, trust_remote_code)
    get_spec(cfg.model_type)  # fail early on unknown architectures
    stored = _as_dtype(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None))
    if dtype == "auto":
        dtype = compute_dtype(device, stored)
    kw = {}
    qc = getattr(cfg, "quantization_config", None)
    if qc is not None and _get(qc, "quant_method") == "compressed-tensors":
        # other compressed-tensors formats: transformers dequantizes at load, in the checkpoint dtype
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        if is_packed_checkpoint(path):  # moeq / llm-compressor int exports: exact (q - zero) * scale
            m = load_packed(path, stored, trust_remote_code)
        else:  # read in the stored dtype, cast below: identical values for plain checkpoints
            m = AutoModelForCausalLM.from_pretrained(path, dtype=stored, trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"cannot load the weights of {path!r}: {e}; the files may be incomplete or corrupt: "
                              "fetch the checkpoint again") from None
    tok = load_tokenizer(path, trust_remote_code)
    # quantized checkpoints may come back with some weights in the storage dtype (e.g. dequantized
    # bf16 experts): compute in one dtype
    cast_floating(m, dtype).eval()
    m.config.dtype = dtype  # what the model holds now (the storage dtype is kept in Loaded)
    return Loaded(m, tok, path, stored)


def cast_floating(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters in place (``.to`` is refused on quantized HF models); buffers such as
    rotary frequencies are only ever up-cast."""
    for t in model.parameters():
        if t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)
    for t in model.buffers():
        if t.is_floating_point() and torch.finfo(t.dtype).bits < torch.finfo(dtype).bits:
            t.data = t.data.to(dtype)
    return model


def _get(obj, key):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _as_dtype(dt) -> torch.dtype:
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32
