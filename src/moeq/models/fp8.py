"""Block-FP8 source checkpoints (DeepSeek-V3/R1, Qwen3-*-FP8): dequantize one weight at a time.

Such checkpoints say ``quantization_config.quant_method == "fp8"`` and store each quantized linear's
weight as ``float8_e4m3fn`` next to ``<name>_scale_inv`` (float32), one scale per block of
``weight_block_size`` (128 x 128) elements:

    W[r, c] = float(W_fp8[r, c]) * scale_inv[r // 128, c // 128]

(the last row/column blocks may be partial). moeq reads them block by block while streaming and never
writes FP8: the dequantized weights are what the quantizers see, in the run's compute dtype.
"""

from __future__ import annotations

import torch

SCALE_SUFFIX = "_scale_inv"


def is_fp8_config(quantization_config) -> bool:
    qc = quantization_config or {}
    get = qc.get if isinstance(qc, dict) else lambda k, d=None: getattr(qc, k, d)
    return get("quant_method") == "fp8"


def block_size(quantization_config) -> tuple[int, int]:
    qc = quantization_config or {}
    get = qc.get if isinstance(qc, dict) else lambda k, d=None: getattr(qc, k, d)
    bs = get("weight_block_size") or (128, 128)
    return int(bs[0]), int(bs[1])


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W (out, in) float8 and scale_inv (ceil(out/b0), ceil(in/b1)) -> dequantized W (out, in) in ``dtype``."""
    out, inp = w.shape
    b0, b1 = block
    s = scale_inv.float().repeat_interleave(b0, 0)[:out].repeat_interleave(b1, 1)[:, :inp]  # (out, in)
    return (w.float() * s).to(dtype)
