"""Read tensors of a safetensors checkpoint on demand: the storage side of streaming.

A :class:`CheckpointReader` knows which shard holds each key (``model.safetensors.index.json``, a
single ``model.safetensors``, or every ``*.safetensors`` file of the folder) and reads a set of keys by
opening each shard only for as long as it takes to read them, so nothing of the checkpoint stays mapped
between blocks. Weights come back in the compute dtype on the compute device, already dense:

* plain float tensors are cast;
* block-FP8 linears (``weight`` float8 + ``weight_scale_inv``, :mod:`.fp8`) are dequantized;
* pack-quantized compressed-tensors linears (``weight_packed``/``weight_scale``/``weight_zero_point``, what
  moeq and llm-compressor write) are dequantized to (q - zero) * scale, rounded to the storage dtype
  exactly as any loader of the file computes it.

Keys are the checkpoint's own names; mapping moeq's module names to them is the caller's job.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..quant.primitives import QuantArgs, dequantize
from .fp8 import SCALE_SUFFIX, block_size, dequantize_fp8, is_fp8_config

INDEX = "model.safetensors.index.json"


class CheckpointReadError(ValueError):
    """A checkpoint whose tensors cannot be read (missing, truncated or not safetensors)."""


def _shard_map(path: Path) -> dict[str, Path]:
    """checkpoint key -> the shard file holding it."""
    idx = path / INDEX
    if idx.is_file():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointReadError(f"{idx} is not a valid safetensors index ({e}); re-save the checkpoint") from None
        return {k: path / f for k, f in wm.items()}
    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointReadError(f"{path} has no safetensors weights (model.safetensors or an index); moeq reads "
                                  "safetensors checkpoints only: convert it with save_pretrained(safe_serialization=True)")
    out = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        except (SafetensorError, OSError) as e:
            raise CheckpointReadError(f"{f} is not a readable safetensors file ({e}); the download may be "
                                      "incomplete: fetch the checkpoint again") from None
    return out


def _packed_scheme(qc: dict) -> dict[str, QuantArgs]:
    """target regex -> weight QuantArgs of a compressed-tensors quantization_config."""
    out = {}
    for group in (qc.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        for t in group.get("targets", []):
            out[t] = QuantArgs(w["num_bits"], w.get("group_size") or -1, w.get("symmetric", True))
    return out


class CheckpointReader:
    """Tensors of the checkpoint in ``path`` by key, read shard by shard when asked."""

    def __init__(self, path: str | Path, config=None):
        self.path = Path(path)
        self.where = _shard_map(self.path)
        qc = getattr(config, "quantization_config", None) if config is not None else None
        qc = qc.to_dict() if hasattr(qc, "to_dict") else (qc or {})
        self.fp8_block = block_size(qc) if is_fp8_config(qc) else None
        self.packed = _packed_scheme(qc) if qc.get("format") == "pack-quantized" else {}

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def has_weight(self, module: str) -> bool:
        """Whether ``module.weight`` can be read (plain, FP8 or packed)."""
        return f"{module}.weight" in self.where or f"{module}.weight_packed" in self.where

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{key: shape} from every shard's header (nothing else is read); a missing or unreadable shard is an
        error naming it."""
        out = {}
        for f in sorted(set(self.where.values())):
            if not f.is_file():
                raise CheckpointReadError(f"{f.name}, named in {self.path / INDEX}, is missing; the download is "
                                          "incomplete: fetch the checkpoint again")
            try:
                with safe_open(str(f), "pt") as h:
                    out.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys() if self.where.get(k) == f})
            except (SafetensorError, OSError) as e:
                raise CheckpointReadError(f"{f} is not a readable safetensors file ({e}); the download may be "
                                          "incomplete: fetch the checkpoint again") from None
        return out

    def nbytes(self) -> int:
        """Bytes of the shards on disk."""
        return sum(f.stat().st_size for f in set(self.where.values()))

    def _scheme(self, module: str) -> QuantArgs:
        for target, args in self.packed.items():
            if target.startswith("re:") and re.match(target[3:], module):
                return args
        raise CheckpointReadError(f"{self.path}: no config group of quantization_config targets {module}")

    def read(self, keys: list[str], dtype: torch.dtype | None = None, device="cpu",
             storage_dtype: torch.dtype | None = None,
             slices: dict[str, tuple[str, slice | int]] | None = None) -> dict[str, torch.Tensor]:
        """{key: tensor} for ``keys`` on ``device``; floating tensors in ``dtype`` (None: as stored; FP8 weights
        come back in fp32, packed ones in ``storage_dtype``).

        ``slices`` maps a requested key to (stored key, index) for tensors stored inside a larger one (a fused
        expert tensor). Weights stored as FP8 or pack-quantized are dequantized (see the module docstring)."""
        slices = slices or {}
        need: dict[Path, list[str]] = {}
        plan: dict[str, tuple] = {}
        for k in keys:
            src = slices.get(k, (k, None))[0]
            base = k[: -len(".weight")] if k.endswith(".weight") else None
            if src in self.where:
                parts = [src] + ([src + SCALE_SUFFIX] if self.fp8_block and src + SCALE_SUFFIX in self.where else [])
                plan[k] = ("fp8" if len(parts) == 2 else "plain", parts)
            elif base is not None and self.packed_parts(base):
                plan[k] = ("packed", self.packed_parts(base))
            else:
                raise CheckpointReadError(f"{self.path}: the checkpoint has no tensor {src!r}; it does not match "
                                          "its config.json (wrong or incomplete checkpoint)")
            for p in plan[k][1]:
                need.setdefault(self.where[p], {})[p] = None  # a fused tensor serves every expert sliced from it
        raw = {}
        for f, ks in need.items():
            try:
                with safe_open(str(f), "pt", device=str(device)) as h:
                    for key in ks:
                        raw[key] = h.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise CheckpointReadError(f"{f}: cannot read {ks[0]} ({e}); the file may be truncated or corrupt: "
                                          "fetch the checkpoint again") from None
        out = {}
        for k, (kind, parts) in plan.items():
            if kind == "plain":
                t = raw[parts[0]]
                idx = slices.get(k, (None, None))[1]
                t = t[idx].clone() if idx is not None else t  # a copy: the fused tensor is not kept alive
            elif kind == "fp8":
                t = dequantize_fp8(raw[parts[0]], raw[parts[1]], self.fp8_block)
            else:
                t = self._unpack(k[: -len(".weight")], [raw[p] for p in parts], storage_dtype)
            out[k] = t.to(dtype).contiguous() if dtype is not None and t.is_floating_point() else t
        raw.clear()
        return out

    def grid(self, module: str, parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, QuantArgs]:
        """(q (out, in) int8, scale (out, G) fp32, zero (out, G) fp32, args) of a packed linear from its stored
        parts [weight_packed, weight_scale, weight_shape(, weight_zero_point)]."""
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        args = self._scheme(module)
        packed, scale, shape = parts[0], parts[1].float(), torch.Size(parts[2].tolist())  # scale (out, G)
        q = unpack_from_int32(packed, args.num_bits, shape)  # (out, in) int8
        zero = torch.zeros_like(scale)
        if len(parts) > 3 and parts[3].is_floating_point():  # K-quant float minima: moeq's GGUF-only runs store them
            zero, args = parts[3].float(), replace(args, superblock=True)  # as floats (compressed-tensors cannot)
        elif not args.symmetric:
            zero = unpack_from_int32(parts[3], args.num_bits, torch.Size(scale.shape), packed_dim=0).float()
        return q, scale, zero, args

    def packed_parts(self, module: str) -> list[str] | None:
        """The stored keys of a packed linear (None when ``module`` is not packed)."""
        if f"{module}.weight_packed" not in self.where:
            return None
        parts = [f"{module}.weight_packed", f"{module}.weight_scale", f"{module}.weight_shape"]
        return parts + ([f"{module}.weight_zero_point"] if f"{module}.weight_zero_point" in self.where else [])

    def _unpack(self, module: str, parts: list[torch.Tensor], storage_dtype) -> torch.Tensor:
        q, scale, zero, args = self.grid(module, parts)
        W = dequantize(q, scale, zero, args)  # (out, in) fp32
        exact = args.float_zero  # K-quant minima: GGUF-only, llama.cpp's fp32 values
        return W.to(storage_dtype) if storage_dtype is not None and not exact else W
