"""Resolve MODEL (bundled name, local checkpoint dir or hub id) and load it with clear errors.

Bundled models live in ``moeq/bundled/<name>/`` (see :mod:`moeq.models.bundled`). The architecture
is checked against the registry *before* weights are read (config.json's ``model_type`` is read by moeq
itself, so an unsupported model fails at once with the list of supported ``model_type`` values, not with
transformers' advice). A hub id is downloaded once (failing at once when offline). Weights are read from
safetensors only: a checkpoint whose weights are pickle files (``.bin``/``.pt``) is refused unless the
caller allows pickle, and then loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
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


def _unreadable_config(path, e) -> CheckpointError:
    return CheckpointError(f"cannot read the config of {str(path)!r}: {e}. If it is a hub id, this machine may be "
                           "offline: download the checkpoint elsewhere and pass its directory")


def check_model_type(path: str, trust_remote_code: bool = False) -> None:
    """Read a local config.json's ``model_type`` and refuse one moeq has no spec for, before transformers
    parses it (a remote-code config with --trust-remote-code is left to its own class)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _unreadable_config(path, e) from None
    if not isinstance(raw, dict):
        raise _unreadable_config(path, "config.json does not hold a JSON object")
    if trust_remote_code and raw.get("auto_map"):
        return
    if "model_type" not in raw:
        from .registry import supported_model_types

        raise CheckpointError(f"{f} has no model_type; moeq supports: {', '.join(supported_model_types())}")
    get_spec(raw["model_type"])


def load_config(path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    check_model_type(path, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise _unreadable_config(path, e) from None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def weight_files(path: str | Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle weight files) of a checkpoint folder."""
    files = [f for f in Path(path).iterdir() if f.is_file()] if Path(path).is_dir() else []
    pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES and f.name != "training_args.bin"]
    return sorted(f for f in files if f.suffix == ".safetensors"), sorted(pickles)


def check_weights(path: str, allow_pickle: bool = False) -> bool:
    """Whether the checkpoint's weights are pickle files (allowed only with ``allow_pickle``); a folder with
    neither safetensors nor pickle weights is refused."""
    safe, pickles = weight_files(path)
    if safe:
        return False
    if not pickles:
        if list(Path(path).glob("*.gguf")):
            raise CheckpointError(f"{path} is a GGUF-only output (no *.safetensors): run its .gguf in llama.cpp (to load "
                                  "a run in moeq and transformers, quantize with --format compressed-tensors,gguf)")
        raise CheckpointError(f"{path} holds no weight files (*.safetensors); the checkpoint is incomplete: fetch "
                              "or save it again")
    if not allow_pickle:
        raise CheckpointError(
            f"{path} holds only pickle weights ({', '.join(f.name for f in pickles[:3])}), which can run code when "
            "loaded; moeq reads safetensors only: convert it with model.save_pretrained(DIR, safe_serialization=True)"
            " (eval, calib, profile, plan and bench also accept --allow-pickle, which loads it with "
            "torch.load(weights_only=True); quantize does not)")
    return True


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


def open_checkpoint(model: str | None, trust_remote_code: bool = False, allow_pickle: bool = False) -> CheckpointInfo:
    """Resolve MODEL to a local directory and read its config (no weights); unknown architectures and
    pickle-only weights (unless ``allow_pickle``) fail here."""
    path = local_path(model)
    cfg = load_config(path, trust_remote_code)
    get_spec(cfg.model_type)
    check_weights(path, allow_pickle)
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
               trust_remote_code: bool = False, allow_pickle: bool = False) -> Loaded:
    """Load model (eval mode) and tokenizer. dtype "auto": fp32 on CPU, the checkpoint's dtype on GPU.
    ``allow_pickle``: a checkpoint with only .bin/.pt weights is loaded with torch.load(weights_only=True)."""
    from transformers import AutoModelForCausalLM

    path = local_path(model)  # a hub id offline fails here at once, not after transformers' retries
    cfg = load_config(path, trust_remote_code)
    get_spec(cfg.model_type)  # fail early on unknown architectures
    pickled = check_weights(path, allow_pickle)
    stored = _as_dtype(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None))
    if dtype == "auto":
        dtype = compute_dtype(device, stored)
    kw = {}
    qc = getattr(cfg, "quantization_config", None)
    if qc is not None and _get(qc, "quant_method") == "compressed-tensors":
        # other compressed-tensors formats: transformers dequantizes at load, in the checkpoint dtype
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    if not pickled and qc is None:  # names and shapes against the config, from the headers, before any read
        _check_keys(path, cfg, stored, trust_remote_code)
    try:
        if is_packed_checkpoint(path):  # moeq / llm-compressor int exports: exact (q - zero) * scale
            m = load_packed(path, stored, trust_remote_code)
        else:  # read in the stored dtype, cast below: identical values for plain checkpoints
            m, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=stored, trust_remote_code=trust_remote_code, use_safetensors=not pickled,
                weights_only=True, output_loading_info=True, **kw)
            _check_loading_info(path, info, getattr(m.config, "num_hidden_layers", None))
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot load the weights of {path!r}: {_one_line(e)}; the files may be incomplete or "
                              "corrupt: fetch the checkpoint again") from None
    tok = load_tokenizer(path, trust_remote_code)
    # quantized checkpoints may come back with some weights in the storage dtype (e.g. dequantized
    # bf16 experts): compute in one dtype
    cast_floating(m, dtype).eval()
    m.config.dtype = dtype  # what the model holds now (the storage dtype is kept in Loaded)
    return Loaded(m, tok, path, stored)


def _check_keys(path: str, cfg, stored: torch.dtype, trust_remote_code: bool) -> None:
    """Every tensor the config implies is in the safetensors headers with its shape, and no layer beyond the
    config's is (the streaming source checks exactly this when it opens a checkpoint; nothing is read)."""
    from .lazy import CheckpointSource

    CheckpointSource(path, cfg, stored, stored, "cpu", trust_remote_code)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500]


def _check_loading_info(path: str, info: dict, num_layers: int | None) -> None:
    """transformers initialises weights the checkpoint lacks at random, drops mismatched ones and ignores layers
    beyond the config's: refuse all three."""
    missing = list(info.get("missing_keys") or [])
    mismatched = [k for k, *_ in info.get("mismatched_keys") or []]
    layers = [int(i) for k in info.get("unexpected_keys") or [] for i in re.findall(r"\blayers\.(\d+)\.", k)]
    if num_layers is not None and layers and max(layers) >= num_layers:
        raise CheckpointError(f"{path}: the weights hold more layers than the {num_layers} its config.json "
                              "describes; the config does not belong to these weights")
    if missing or mismatched:
        what = (f"{len(missing)} tensors its config implies are missing (e.g. {', '.join(sorted(missing)[:3])})"
                if missing else f"{len(mismatched)} tensors have other shapes than its config says "
                                f"(e.g. {', '.join(sorted(mismatched)[:3])})")
        raise CheckpointError(f"{path}: {what}; the config does not belong to these weights or the download is "
                              "incomplete")


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
