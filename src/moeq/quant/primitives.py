"""The integer grid: quantization arguments, scales/zero points, quantize and dequantize.

The only code in moeq that knows integer grids. Conventions follow compressed-tensors exactly so
that an export is a serialisation, not a translation:

* signed integers q in [-2^(b-1), 2^(b-1) - 1] (int4: [-8, 7]);
* symmetric: zero = 0, scale = max|w| / ((qmax - qmin) / 2); ``full_range`` (auto-round's and llama.cpp's Q4_0
  rule): scale = +-max|w| / -qmin, its sign chosen so that the extreme of larger magnitude lands exactly on
  qmin, so all 2^b integers are used (at 2 bits the levels are max|w| x {-1, -1/2, 0, 1/2} instead of
  max|w| x {-4/3, -2/3, 0, 2/3}). Same integers and storage; scales may be negative;
* asymmetric: scale = (max - min) / (qmax - qmin) with 0 kept in range, zero = qmin - round(min / scale);
* q = clamp(round(w / scale) + zero, qmin, qmax), w_hat = (q - zero) * scale (:func:`grid_round`,
  :func:`grid_value`: the one implementation every solver, search and the activation quantizer use);
* per-channel (group_size = -1) or groups of ``group_size`` consecutive input columns; with act-order
  ``g_idx[j]`` names the group of column j;
* ``ggml`` (runs writing GGUF): symmetric integers avoid -2^(b-1) (Q8_0 holds [-127, 127]) and asymmetric
  scales keep 7 significant bits (Q4_1's block minima are then fp16 numbers), so ggml blocks hold the grid;
* ``superblock`` (llama.cpp's K-quant scale grid, symmetric groups of 16): the 16 scales of each 256-column
  super-block are snapped to 2^e k with one power of two per super-block and integers 1 <= k <= 31 (grids
  of <= 3 bits: Q3_K's 6-bit signed scales) or 127 (4-6 bits: Q6_K's int8 scales), so GGUF stores the
  grid exactly as Q3_K / Q6_K (and the scales stay exact bf16 numbers) (:func:`snap_superblocks`).

Scales are rounded to the checkpoint's storage dtype (``scale_dtype``, bf16 for bf16 models) before
the integers are chosen, so the exported checkpoint dequantizes to exactly moeq's in-memory weights.

:func:`hessian_error` is the one implementation of the layer loss tr(D H D^T) of a weight error D.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch


class SignedGrid:
    """Integer range of a signed ``num_bits`` grid, shared by weight and activation schemes; a symmetric
    ``ggml`` grid drops the lowest integer ([-(2^(b-1) - 1), 2^(b-1) - 1]: ggml's Q8_0 range)."""

    num_bits: int
    symmetric: bool = True
    ggml: bool = False

    @property
    def qmin(self) -> int:
        return -(1 << (self.num_bits - 1)) + int(self.ggml and self.symmetric)

    @property
    def qmax(self) -> int:
        return (1 << (self.num_bits - 1)) - 1


@dataclass(frozen=True)
class QuantArgs(SignedGrid):
    """Weight quantization arguments (field names mirror compressed-tensors' QuantizationArgs)."""

    num_bits: int = 4
    group_size: int = 128  # -1: one scale per output channel
    symmetric: bool = True
    superblock: bool = False  # K-quant scale grid (see the module docstring)
    ggml: bool = False  # fits ggml's legacy blocks exactly (runs writing GGUF): see :func:`qparams_from_range`
    full_range: bool = False  # symmetric: signed scales, all 2^b integers used (see the module docstring)

    def __post_init__(self):
        if not isinstance(self.num_bits, int) or not 2 <= self.num_bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {self.num_bits!r} (use --bits 2..8)")
        if self.group_size != -1 and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group size must be -1 (per channel) or a positive integer, got {self.group_size!r}")
        if self.superblock and (self.group_size != 16 or not self.symmetric or self.num_bits > 6):
            raise ValueError("--kquant-scales (llama.cpp's Q3_K/Q6_K grids) needs --group-size 16, --sym and "
                             f"--bits 2..6, got {self.label()}")
        if self.full_range and (not self.symmetric or self.superblock):
            raise ValueError("--full-range is a symmetric-grid option without --kquant-scales; drop --asym / "
                             "--kquant-scales or --full-range")

    @property
    def kmax(self) -> int:
        """Largest scale multiplier of a super-block (Q3_K: 31, Q6_K: 127)."""
        return 31 if self.num_bits <= 3 else 127

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size == -1 else "group"

    def check_width(self, in_features: int, name: str = "") -> None:
        if self.group_size != -1 and in_features % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide the input width {in_features} of {name or 'a linear'}; "
                f"use a group size that divides it (e.g. 32, 64) or -1 for per-channel scales")
        if self.superblock and in_features % 256:
            raise ValueError(f"--kquant-scales needs input widths that are multiples of 256 (llama.cpp's K-quant "
                             f"super-blocks); {name or 'a linear'} has {in_features}: give it another scheme in a plan")

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def label(self) -> str:
        g = "c" if self.group_size == -1 else str(self.group_size)
        return (f"w{self.num_bits}g{g}{'' if self.symmetric else 'a'}{'k' if self.superblock else ''}"
                f"{'x' if self.ggml else ''}{'f' if self.full_range else ''}")

    def to_dict(self) -> dict:
        return asdict(self)


def _round_scale(scale: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    # a constant-zero row still gets a usable scale; a negative (full-range) scale keeps its sign
    scale = torch.where(scale < 0, scale.clamp(max=-1e-10), scale.clamp(min=1e-10))
    if scale_dtype is not None and scale_dtype != scale.dtype:
        scale = scale.to(scale_dtype).to(torch.float32)
    return scale


def _straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y in the forward pass, x's gradient in the backward pass (rounding steps stay trainable: LWC)."""
    return y if not x.requires_grad else y.detach() + (x - x.detach())


def qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, args: QuantArgs,
                       scale_dtype: torch.dtype | None = None,
                       round_fn: Callable[[torch.Tensor], torch.Tensor] = torch.round) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point from per-(row, group) minima/maxima. Differentiable in the ranges with a
    straight-through ``round_fn`` (the scale's own roundings pass gradients straight through): LWC trains on
    exactly this grid."""
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))  # 0 must be representable
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    qrange = float(args.qmax - args.qmin)
    if args.symmetric and args.full_range:  # the larger extreme on qmin: scale signed, all integers used
        top = torch.where(xmin.abs() > xmax, xmin.abs(), -xmax)  # (..., G) signed: qmin * scale is that extreme
        scale, zero = _round_scale(top / -args.qmin, scale_dtype), torch.zeros_like(top)
    elif args.symmetric:
        scale = _round_scale(torch.maximum(xmin.abs(), xmax) / (qrange / 2), scale_dtype)
        if args.superblock and scale.shape[-1] % 16 == 0:  # whole rows of groups: snap their super-blocks
            scale = _straight_through(scale, snap_superblocks(scale.detach(), args.kmax))
        zero = torch.zeros_like(scale)
    else:
        scale = _round_scale((xmax - xmin) / qrange, scale_dtype)
        if args.ggml:  # 7 significant bits: Q4_1's block minimum -(8 + z) s (<= 11 bits) is then an fp16 number
            mant, ex = torch.frexp(scale.detach())
            scale = _straight_through(scale, torch.ldexp(torch.round(mant * 128) / 128, ex))
        zero = torch.clamp(args.qmin - round_fn(xmin / scale), args.qmin, args.qmax)
    return scale, zero


def snap_superblocks(scale: torch.Tensor, kmax: int) -> torch.Tensor:
    """(..., G) group scales -> 2^e k per super-block of 16 groups: e the smallest exponent with
    max(scale) / 2^e <= kmax, k = clamp(round(scale / 2^e), 1, kmax). Exact in fp16 and bf16 (k < 2^7)."""
    s = scale.reshape(*scale.shape[:-1], -1, 16)  # (..., G/16, 16)
    top = s.amax(-1, keepdim=True).clamp_min(1e-30)  # (..., G/16, 1)
    d = torch.exp2(torch.ceil(torch.log2(top / kmax))).clamp(min=2.0 ** -24)  # (..., G/16, 1) fp16-representable
    k = torch.clamp(torch.round(s / d), 1, kmax)  # (..., G/16, 16)
    return (k * d).reshape(scale.shape)


def group_view(W: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """(out, in) -> (out, G, gs) with consecutive columns grouped (per channel: G = 1)."""
    out, inp = W.shape
    gs = inp if args.group_size == -1 else args.group_size
    return W.reshape(out, inp // gs, gs)


def compute_qparams(W: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None,
                    shrink: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scales of W (out, in) per (row, group), optionally shrunk by a clip factor. -> (out, G) x2."""
    Wg = group_view(W.float(), args)  # (out, G, gs)
    return qparams_from_range(Wg.amin(-1) * shrink, Wg.amax(-1) * shrink, args, scale_dtype)


def _expand(t: torch.Tensor, args: QuantArgs, inp: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """(out, G) -> (out, in): the parameter of each weight's group."""
    if g_idx is not None:
        return t[:, g_idx]
    gs = inp if args.group_size == -1 else args.group_size
    return t.repeat_interleave(gs, dim=1)


def grid_round(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, grid: SignedGrid,
               round_fn: Callable[[torch.Tensor], torch.Tensor] = torch.round) -> torch.Tensor:
    """clamp(round(x / scale) + zero, qmin, qmax): the integers of x, as floats of x's dtype. ``scale``
    and ``zero`` broadcast against x; ``zero`` None = symmetric without a zero point (activations);
    ``round_fn`` may pass gradients straight through (LWC)."""
    r = round_fn(x / scale)
    return torch.clamp(r if zero is None else r + zero, grid.qmin, grid.qmax)


def grid_value(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """(q - zero) * scale: the real value of grid integers q (``zero`` None: q * scale)."""
    return (q if zero is None else q - zero) * scale


def hessian_error(D: torch.Tensor, H: torch.Tensor | None = None) -> torch.Tensor:
    """tr(D H D^T) per matrix for a weight error D (out, in) with H (in, in), or batched D (B, out, in)
    with H (B, in, in) or (in, in); H None = sum(D^2). -> 0-d tensor, or (B,)."""
    return (((D @ H) * D) if H is not None else D.pow(2)).sum((-2, -1))


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs,
             g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Integers of W (out, in) on the grid -> int8 (out, in)."""
    inp = W.shape[1]
    s, z = _expand(scale, args, inp, g_idx), _expand(zero, args, inp, g_idx)  # (out, in) x2
    return grid_round(W.float(), s, z, args).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """(q - zero) * scale, in fp32 -> (out, in)."""
    inp = q.shape[1]
    return grid_value(q.float(), _expand(scale, args, inp, g_idx), _expand(zero, args, inp, g_idx))


def fake_quantize(W: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    scale, zero = compute_qparams(W, args, scale_dtype)
    return dequantize(quantize(W, scale, zero, args), scale, zero, args)


def search_clip(W: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None, grid: int = 80,
                max_shrink: float = 0.8, norm: float = 2.4) -> torch.Tensor:
    """MSE clip search (GPTQ/QuaRot style): per (row, group) pick the shrink p in {1.00, 0.99, ...,
    1 - max_shrink + 0.01} minimising sum |w - q(w)|^norm. Returns the shrink factors (out, G)."""
    Wg = group_view(W.float(), args)  # (out, G, gs)
    xmin, xmax = Wg.amin(-1), Wg.amax(-1)  # (out, G)
    best = torch.full_like(xmin, float("inf"))
    best_p = torch.ones_like(xmin)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        s, z = (t[..., None] for t in qparams_from_range(xmin * p, xmax * p, args, scale_dtype))  # (out, G, 1)
        err = (grid_value(grid_round(Wg, s, z, args), s, z) - Wg).abs().pow(norm).sum(-1)  # (out, G)
        better = err < best
        best = torch.where(better, err, best)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return best_p
