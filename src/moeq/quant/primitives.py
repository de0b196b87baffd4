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
* ``superblock`` (llama.cpp's K-quant scale grid): symmetric groups of 16: the 16 scales of each 256-column
  super-block are snapped to 2^e k with one power of two per super-block and integers 1 <= k <= 31 (grids
  of <= 3 bits: Q3_K's 6-bit signed scales) or 127 (4-6 bits: Q6_K's int8 scales), so GGUF stores the
  grid exactly as Q3_K / Q6_K (and the scales stay exact bf16 numbers) (:func:`snap_superblocks`);
  asymmetric (``float_zero``: Q2_K at 2 bits / groups of 16, Q4_K / Q5_K at 4 / 5 bits / groups of 32): a
  group's values are (q - qmin) s - m with a *float* minimum m >= 0, the scales snapped as above (k <= 15 for
  Q2_K's 4-bit scales, 63 for Q4_K / Q5_K's 6-bit ones) but on llama.cpp's d = max / kmax (an fp16 number, not
  a power of two: the scales are fp32, not bf16, numbers), and the minima the same way (0 <= k <= 15 / 63).
  In moeq's (scale, zero) form the zero point is the float z = qmin + m / s, the
  integers are clamp(round(w / s + z)), the values (q - z) s; only GGUF stores it (compressed-tensors zero
  points are integers).

Scales are rounded to the checkpoint's storage dtype (``scale_dtype``, bf16 for bf16 models) before
the integers are chosen, so the exported checkpoint dequantizes to exactly moeq's in-memory weights.

:func:`hessian_error` is the one implementation of the layer loss tr(D H D^T) of a weight error D.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch


KMIN_LAYOUTS = ((2, 16), (4, 32), (5, 32))  # (bits, group size) of Q2_K, Q4_K, Q5_K
QKK = 256  # columns of a K-quant super-block


class SignedGrid:
    """Integer range of a signed ``num_bits`` grid, shared by weight and activation schemes; a symmetric
    ``ggml`` grid drops the lowest integer ([-(2^(b-1) - 1), 2^(b-1) - 1]: ggml's Q8_0 range)."""

    num_bits: int
    symmetric: bool = True
    ggml: bool = False
    float_zero = False  # zero points are floats (K-quant minima): round(x / s + z), not round(x / s) + z

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
        if self.superblock and self.symmetric and (self.group_size != 16 or self.num_bits > 6):
            raise ValueError("--kquant-scales --sym (llama.cpp's Q3_K/Q6_K grids) needs --group-size 16 and "
                             f"--bits 2..6, got {self.label()}")
        if self.superblock and not self.symmetric and (self.num_bits, self.group_size) not in KMIN_LAYOUTS:
            raise ValueError("--kquant-scales --asym (llama.cpp's Q2_K/Q4_K/Q5_K grids) needs --bits 2 --group-size 16"
                             f" or --bits 4/5 --group-size 32, got {self.label()}")
        if self.full_range and (not self.symmetric or self.superblock):
            raise ValueError("--full-range is a symmetric-grid option without --kquant-scales; drop --asym / "
                             "--kquant-scales or --full-range")

    @property
    def float_zero(self) -> bool:
        return self.superblock and not self.symmetric

    @property
    def kmax(self) -> int:
        """Largest scale (and minimum) multiplier of a super-block (Q3_K: 31, Q6_K: 127, Q2_K: 15, Q4/5_K: 63)."""
        if self.float_zero:
            return 15 if self.num_bits == 2 else 63
        return 31 if self.num_bits <= 3 else 127

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size == -1 else "group"

    def check_width(self, in_features: int, name: str = "") -> None:
        if self.group_size != -1 and in_features % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide the input width {in_features} of {name or 'a linear'}; "
                f"use a group size that divides it (e.g. 32, 64) or -1 for per-channel scales")
        if self.superblock and in_features % QKK:
            raise ValueError(f"--kquant-scales needs input widths that are multiples of 256 (llama.cpp's K-quant "
                             f"super-blocks); {name or 'a linear'} has {in_features}: give it another scheme in a plan")

    def group_bits(self, scale_bits: int = 16) -> float:
        """Bits a group stores besides its integers: a scale (plus a zero point when asymmetric); a K-quant
        group its small scale (and minimum) integer and its share of the super-block's fp16 factor(s)
        (Q3_K 6 + 16/16, Q6_K 8 + 16/16, Q2_K 4 + 4 + 32/16, Q4_K / Q5_K 6 + 6 + 32/8)."""
        if not self.superblock:
            return scale_bits + (0 if self.symmetric else self.num_bits)
        ints = 1 if self.symmetric else 2  # a scale, and a minimum
        return ints * (self.kmax.bit_length() + int(self.symmetric)) + ints * 16 / scale_groups(self)

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
                       round_fn: Callable[[torch.Tensor], torch.Tensor] = torch.round,
                       snap: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from per-(row, group) minima/maxima (..., G). Differentiable in the ranges with a
    straight-through ``round_fn`` (the scale's own roundings pass gradients straight through): LWC trains on
    exactly this grid. K-quant grids (``superblock``) snap their super-blocks when the last dimension holds
    whole ones and ``snap`` (False: the caller snaps the whole row later, :func:`snap_grid`)."""
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))  # 0 must be representable
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    qrange = float(args.qmax - args.qmin)
    whole = snap and args.superblock and scale_groups(args) and xmin.shape[-1] % scale_groups(args) == 0
    if args.symmetric and args.full_range:  # the larger extreme on qmin: scale signed, all integers used
        top = torch.where(xmin.abs() > xmax, xmin.abs(), -xmax)  # (..., G) signed: qmin * scale is that extreme
        scale, zero = _round_scale(top / -args.qmin, scale_dtype), torch.zeros_like(top)
    elif args.symmetric:
        scale = _round_scale(torch.maximum(xmin.abs(), xmax) / (qrange / 2), scale_dtype)
        zero = torch.zeros_like(scale)
        if whole:
            scale, zero = snap_grid(scale, zero, args)
    elif args.float_zero:  # K-quant minima: (q - qmin) s - m, m = -xmin >= 0 a float
        scale = _round_scale((xmax - xmin) / qrange, scale_dtype)  # (..., G)
        zero = args.qmin - xmin / scale  # (..., G) float: qmin + m / s
        if whole:
            scale, zero = snap_grid(scale, zero, args)
    else:
        scale = _round_scale((xmax - xmin) / qrange, scale_dtype)
        if args.ggml:  # 7 significant bits: Q4_1's block minimum -(8 + z) s (<= 11 bits) is then an fp16 number
            mant, ex = torch.frexp(scale.detach())
            scale = _straight_through(scale, torch.ldexp(torch.round(mant * 128) / 128, ex))
        zero = torch.clamp(args.qmin - round_fn(xmin / scale), args.qmin, args.qmax)
    return scale, zero


def scale_groups(args: QuantArgs) -> int:
    """Groups per K-quant super-block (0 for other grids)."""
    return QKK // args.group_size if args.superblock else 0


def snap_superblocks(scale: torch.Tensor, kmax: int, per: int = 16, lo: int = 1, pow2: bool = True) -> torch.Tensor:
    """(..., G) non-negative group numbers -> d k per super-block of ``per`` groups, k = clamp(round(x / d), lo,
    kmax). ``pow2``: d = 2^e, e the smallest exponent with max / 2^e <= kmax (d k is exact in fp16 and bf16,
    k < 2^7); else llama.cpp's d = max / kmax as an fp16 number (d k exact in fp32: GGUF-only grids)."""
    s = scale.reshape(*scale.shape[:-1], -1, per)  # (..., G/per, per)
    top = s.amax(-1, keepdim=True).clamp_min(1e-30)  # (..., G/per, 1)
    if pow2:
        d = torch.exp2(torch.ceil(torch.log2(top / kmax))).clamp(min=2.0 ** -24)  # (..., G/per, 1) fp16-representable
    else:
        d = (top / kmax).clamp(min=2.0 ** -24).half().float()  # (..., G/per, 1)
    k = torch.clamp(torch.round(s / d), lo, kmax)  # (..., G/per, per)
    return (k * d).reshape(scale.shape)


def snap_grid(scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """A K-quant grid's (scale, zero) (..., G) of whole rows snapped to its super-blocks (module docstring):
    the scales, and for float minima the minima m = (z - qmin) s as well, z following. Gradients pass
    straight through the snapping."""
    per, pow2 = scale_groups(args), not args.float_zero  # float-minimum grids are GGUF-only: fp16 super-scales
    snapped = _straight_through(scale, snap_superblocks(scale.detach(), args.kmax, per, pow2=pow2))  # (..., G)
    if not args.float_zero:
        return snapped, zero
    low = (zero - args.qmin) * scale  # (..., G) minima m >= 0
    low = _straight_through(low, snap_superblocks(low.detach(), args.kmax, per, lo=0, pow2=False))
    return snapped, args.qmin + low / snapped


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
    if zero is not None and grid.float_zero:
        return torch.clamp(round_fn(x / scale + zero), grid.qmin, grid.qmax)
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
