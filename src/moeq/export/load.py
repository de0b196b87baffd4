"""Load a ``pack-quantized`` compressed-tensors checkpoint back as a dense model, exactly.

transformers can load these checkpoints too (and the round-trip test checks that it gives moeq's
logits), but its fused-expert path ignores zero points of asymmetric grids. This loader works for
every grid: it builds the model from its config, takes the per-expert view from the registry, reads
each linear's ``weight_packed`` / ``weight_scale`` / ``weight_zero_point`` under its checkpoint name,
dequantizes with compressed-tensors' own unpacking, rounds to the checkpoint dtype (what any loader
of the file computes) and re-fuses the experts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..models.adapter import ModelAdapter
from ..quant.primitives import QuantArgs, dequantize


def _scheme_of(qc: dict, name: str) -> QuantArgs | None:
    import re

    for group in qc.get("config_groups", {}).values():
        for t in group.get("targets", []):
            if t.startswith("re:") and re.match(t[3:], name):
                w = group["weights"]
                return QuantArgs(w["num_bits"], w.get("group_size") or -1, w.get("symmetric", True))
    return None


def is_packed_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors" and qc.get("format") == "pack-quantized"


def _tensors(path: Path) -> dict[str, str]:
    """key -> safetensors file holding it."""
    idx = path / "model.safetensors.index.json"
    if idx.is_file():
        return {k: str(path / f) for k, f in json.loads(idx.read_text())["weight_map"].items()}
    f = str(path / "model.safetensors")
    with safe_open(f, "pt") as h:
        return {k: f for k in h.keys()}


def load_packed(path: str | Path, storage_dtype: torch.dtype, trust_remote_code: bool = False):
    """Dense model (storage dtype) whose quantized linears hold exactly (q - zero) * scale."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    qc = raw.pop("quantization_config")
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=storage_dtype, trust_remote_code=trust_remote_code)
    adapter = ModelAdapter.for_model(model).unfuse()
    where = _tensors(path)
    handles: dict[str, object] = {}

    def get(key):
        f = where[key]
        if f not in handles:
            handles[f] = safe_open(f, "pt")
        return handles[f].get_tensor(key)

    state = {}
    for key in model.state_dict():
        mod, _, leaf = key.rpartition(".")
        ck = adapter.checkpoint_name(key)
        ck_mod = adapter.checkpoint_name(mod)
        if leaf == "weight" and f"{ck_mod}.weight_packed" in where:
            args = _scheme_of(qc, ck_mod)
            if args is None:
                raise ValueError(f"{path}: no config group of quantization_config targets {ck_mod}")
            shape = torch.Size(get(f"{ck_mod}.weight_shape").tolist())
            q = unpack_from_int32(get(f"{ck_mod}.weight_packed"), args.num_bits, shape)  # (out, in) int8
            scale = get(f"{ck_mod}.weight_scale").float()  # (out, G)
            zero = torch.zeros_like(scale)
            if not args.symmetric:
                zero = unpack_from_int32(get(f"{ck_mod}.weight_zero_point"), args.num_bits,
                                         torch.Size(scale.shape), packed_dim=0).float()
            state[key] = dequantize(q, scale, zero, args).to(storage_dtype)
        elif ck in where:
            state[key] = get(ck)
        elif key.endswith(f"{adapter.spec.lm_head}.weight") and getattr(cfg, "tie_word_embeddings", False):
            continue
        else:
            raise ValueError(f"{path}: the checkpoint has no tensor for {key} (looked for {ck})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (getattr(cfg, "tie_word_embeddings", False) and "lm_head" in k)]
    if missing:
        raise ValueError(f"{path}: tensors missing from the checkpoint: {missing[:5]}")
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    adapter.refuse()
    return model
