"""moeq's integer grids as ggml block types, exactly: which type holds a grid, and the block bytes.

ggml's legacy types quantize blocks of 32 consecutive weights of a row (ggml-common.h):

* Q4_0 ``{fp16 d; u8 qs[16]}``: weight j is the low nibble of qs[j], j+16 the high one, value (n - 8) d;
* Q4_1 ``{fp16 d; fp16 m; u8 qs[16]}``: same nibbles, value n d + m;
* Q8_0 ``{fp16 d; i8 qs[32]}``: value q d, q in [-127, 127] (ggml's int8 dot products assume no -128).

A moeq grid value is (q - z) s with one (s, z) per group of g columns; with g a multiple of 32 every
ggml block lies inside one group, so a grid is *exactly* a block type when its numbers fit (s must be
an fp16 number; bf16 scales are, unless tiny):

* Q4_0 when every q - z lies in [-8, 7] (symmetric grids of <= 4 bits): d = s;
* Q4_1 when q and z lie in [-8, 7] and m = -(8 + z) s is an fp16 number (asymmetric <= 4 bits): n = q + 8;
* Q8_0 when every q - z lies in [-127, 127] (any grid of <= 7 bits, 8-bit ones that avoid -128): d = s;
* otherwise (another group size, a -128) the values themselves as F32, exact.

The first that fits, in that order, is used. Symmetric grids of 16-column groups whose scales lie on the
K-quant grid (``--kquant-scales``: per 256-column super-block, scale = d k with d a power of two and
integer k <= 31 / 127) are :class:`KGrid` grids and go to the K-quant types (ggml-common.h, ggml-quants.c):

* Q3_K ``{u8 hmask[32]; u8 qs[64]; u8 scales[12]; fp16 d}`` (3.44 bits/weight) when q in [-4, 3], k <= 31:
  element e of a super-block keeps q & 3 in bits 2j..2j+1 of qs[32 h + l] and q >= 0 in bit 4h + j of
  hmask[l] (h = e // 128, j = e % 128 // 32, l = e % 32), sub-block e // 16 its 6-bit scale k + 32;
* Q6_K ``{u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d}`` (6.56 bits/weight) when q in [-32, 31], k <= 127:
  u = q + 32, its low nibble in ql, its high 2 bits in qh, interleaved per 32-element quarter (c = e % 128 // 32).

Asymmetric K-quant grids (``--kquant-scales --asym``: float zero points z = qmin + m / s, values (q - z) s =
u s - m with u = q - qmin) are :class:`KMGrid` grids: per super-block s = d k and m = dmin n with fp16 d, dmin
and integers k, n (llama.cpp's value u d k - dmin n):

* Q2_K ``{u8 scales[16]; u8 qs[64]; fp16 d; fp16 dmin}`` (2.63 bits/weight), 2-bit grids of 16 columns,
  k, n <= 15: scales[e // 16] = k | n << 4, u in bits 2j..2j+1 of qs[32 h + e % 32] (Q3_K's qs layout);
* Q4_K ``{fp16 d; fp16 dmin; u8 scales[12]; u8 qs[128]}`` (4.5) and Q5_K ``{fp16 d; fp16 dmin; u8 scales[12];
  u8 qh[32]; u8 qs[128]}`` (5.5), 4- / 5-bit grids of 32 columns, k, n <= 63: the 8 6-bit (k, n) pairs packed as
  ggml's get_scale_min_k4 reads them; in each 64-element chunk c element l (< 32) is the low nibble of
  qs[32 c + l] and element 32 + l the high one; Q5_K's fifth bit is bit 2c (resp. 2c + 1) of qh[l].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as GT

QK = 32  # weights per ggml block
ORDER = ("Q4_0", "Q4_1", "Q8_0", "F32")  # narrowest first: a stacked tensor takes the first its members all fit


@dataclass
class Grid:
    """One linear's integers on 32-column blocks: value = (q - z) * s."""

    q: np.ndarray  # (out, in) int
    s: np.ndarray  # (out, in // 32) float32 (scales, already rounded to the checkpoint dtype)
    z: np.ndarray  # (out, in // 32) int (0 when symmetric)

    def values(self) -> np.ndarray:
        b = (self.q.astype(np.float32) - np.repeat(self.z, QK, 1)) * np.repeat(self.s, QK, 1)  # (out, in)
        return b.astype(np.float32)

    def rows(self, fn) -> "Grid":
        """The same grid with its rows rearranged by ``fn`` (applied to every (rows, ...) array)."""
        return Grid(fn(self.q), fn(self.s), fn(self.z))

    def offsets(self) -> np.ndarray:
        return self.q - np.repeat(self.z, QK, 1)  # (out, in) q - z

    def m(self) -> np.ndarray:
        return -(8 + self.z.astype(np.float32)) * self.s  # (out, in // 32) Q4_1's block minimum


def grid_from(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> Grid | None:
    """Blocks of 32 from a (q, per-group scale, zero) grid; None when its groups do not align with 32-blocks."""
    out, inp = q.shape
    groups = scale.shape[1]
    if inp % QK or inp % groups or (inp // groups) % QK or not np.array_equal(zero, np.round(zero)):
        return None
    k = (inp // groups) // QK
    return Grid(q.astype(np.int16), np.repeat(scale.astype(np.float32), k, 1), np.repeat(zero.astype(np.int16), k, 1))


def fits(g: Grid, qtype: str) -> bool:
    if qtype == "F32":
        return True
    if not _fp16_exact(g.s):
        return False
    v = g.offsets()
    if qtype == "Q4_0":
        return -8 <= int(v.min()) and int(v.max()) <= 7
    if qtype == "Q4_1":
        return (-8 <= int(g.q.min()) and int(g.q.max()) <= 7 and -8 <= int(g.z.min()) and int(g.z.max()) <= 7
                and _fp16_exact(g.m()))
    return -127 <= int(v.min()) and int(v.max()) <= 127  # Q8_0


def _fp16_exact(s: np.ndarray) -> bool:
    return bool((s.astype(np.float16).astype(np.float32) == s).all())


def choose(grids: list[Grid | None]) -> str:
    """The narrowest type every member fits (a stacked expert tensor has one type)."""
    if any(g is None for g in grids):
        return "F32"
    return next(t for t in ORDER if all(fits(g, t) for g in grids))


def _nibbles(u: np.ndarray) -> np.ndarray:
    """(..., nb, 32) values 0..15 -> (..., nb, 16) bytes: byte j = u[j] | u[j + 16] << 4."""
    return (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype="<f2")[..., None].view(np.uint8)  # (..., nb, 2)


def pack(g: Grid, qtype: str) -> tuple[np.ndarray, GT]:
    """(raw bytes (out, in // 32 * block bytes), ggml type) of one linear; F32 gives the values."""
    if qtype == "F32":
        return g.values(), GT.F32
    out, inp = g.q.shape
    nb = inp // QK
    v = g.offsets().reshape(out, nb, QK)  # q - z
    if qtype == "Q8_0":
        raw = np.concatenate([_f16_bytes(g.s), v.astype(np.int8).view(np.uint8)], -1)  # (out, nb, 34)
        return raw.reshape(out, nb * 34), GT.Q8_0
    if qtype == "Q4_0":
        raw = np.concatenate([_f16_bytes(g.s), _nibbles((v + 8).astype(np.uint8))], -1)  # (out, nb, 18)
        return raw.reshape(out, nb * 18), GT.Q4_0
    n = (g.q.reshape(out, nb, QK) + 8).astype(np.uint8)  # (out, nb, 32) nibbles
    raw = np.concatenate([_f16_bytes(g.s), _f16_bytes(g.m()), _nibbles(n)], -1)  # (out, nb, 20)
    return raw.reshape(out, nb * 20), GT.Q4_1


QKK = 256  # weights per K-quant super-block


@dataclass
class KGrid:
    """One linear's symmetric integers on 16-column groups: value = q * s."""

    q: np.ndarray  # (out, in) int, in % 256 == 0
    s: np.ndarray  # (out, in // 16) float32

    def values(self) -> np.ndarray:
        return (self.q.astype(np.float32) * np.repeat(self.s, 16, 1)).astype(np.float32)  # (out, in)

    def rows(self, fn) -> "KGrid":
        return KGrid(fn(self.q), fn(self.s))

    def superblocks(self, kmax: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(d (out, in // 256) powers of two, k (out, in // 256, 16) ints) with s = d k, or None."""
        s = self.s.reshape(self.s.shape[0], -1, 16)  # (out, nb, 16)
        top = s.max(-1)  # (out, nb)
        if (top <= 0).any():
            return None
        d = np.exp2(np.ceil(np.log2(top / kmax))).astype(np.float32)  # (out, nb)
        k = s / d[..., None]
        if not (np.array_equal(k, np.round(k)) and k.min() >= 0 and k.max() <= kmax and _fp16_exact(d)):
            return None
        return d, k.astype(np.int16)


def kgrid_from(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> KGrid | None:
    """A symmetric 16-column-group grid on whole super-blocks, else None."""
    out, inp = q.shape
    if zero.any() or inp % QKK or scale.shape[1] * 16 != inp:
        return None
    return KGrid(q.astype(np.int16), scale.astype(np.float32))


def fits_k(g: KGrid, qtype: str) -> bool:
    lo, hi, kmax = (-4, 3, 31) if qtype == "Q3_K" else (-32, 31, 127)
    return lo <= int(g.q.min()) and int(g.q.max()) <= hi and g.superblocks(kmax) is not None


def pack_k(g: KGrid, qtype: str) -> tuple[np.ndarray, GT]:
    """Raw bytes (out, in // 256 * block bytes) of a Q3_K or Q6_K tensor."""
    out, inp = g.q.shape
    nb = inp // QKK
    d, k = g.superblocks(31 if qtype == "Q3_K" else 127)  # (out, nb), (out, nb, 16)
    q = g.q.reshape(out, nb, 2, 4, 32).astype(np.int16)  # (out, nb, h, j|c, l): element 128 h + 32 j + l
    if qtype == "Q3_K":
        low = (q & 3).astype(np.uint8)  # (out, nb, 2, 4, 32)
        qs = (low << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(-2, dtype=np.uint8)  # (out, nb, 2, 32)
        hbit = (q >= 0).astype(np.uint8)  # (out, nb, 2, 4, 32)
        shifts = (4 * np.arange(2)[:, None] + np.arange(4)[None, :]).astype(np.uint8)  # (2, 4) bit 4h + j
        hmask = (hbit << shifts[..., None]).sum((-3, -2), dtype=np.uint8)  # (out, nb, 32)
        sc = (k + 32).astype(np.uint8)  # (out, nb, 16) 6-bit
        b = np.zeros((out, nb, 12), np.uint8)
        b[..., 0:4] = (sc[..., 0:4] & 0xF) | ((sc[..., 8:12] & 0xF) << 4)
        b[..., 4:8] = (sc[..., 4:8] & 0xF) | ((sc[..., 12:16] & 0xF) << 4)
        b[..., 8:12] = ((sc[..., 0:4] >> 4) | ((sc[..., 4:8] >> 4) << 2) | ((sc[..., 8:12] >> 4) << 4)
                        | ((sc[..., 12:16] >> 4) << 6))
        raw = np.concatenate([hmask, qs.reshape(out, nb, 64), b, _f16_bytes(d)], -1)  # (out, nb, 110)
        return raw.reshape(out, nb * 110), GT.Q3_K
    u = (q + 32).astype(np.uint8)  # (out, nb, h, c, l) 0..63
    ql = np.concatenate([(u[..., 0, :] & 0xF) | ((u[..., 2, :] & 0xF) << 4),
                         (u[..., 1, :] & 0xF) | ((u[..., 3, :] & 0xF) << 4)], -1)  # (out, nb, 2, 64)
    qh = ((u[..., 0, :] >> 4) | ((u[..., 1, :] >> 4) << 2) | ((u[..., 2, :] >> 4) << 4)
          | ((u[..., 3, :] >> 4) << 6)).astype(np.uint8)  # (out, nb, 2, 32)
    raw = np.concatenate([ql.reshape(out, nb, 128), qh.reshape(out, nb, 64), k.astype(np.int8).view(np.uint8),
                          _f16_bytes(d)], -1)  # (out, nb, 210)
    return raw.reshape(out, nb * 210), GT.Q6_K


KMIN_TYPES = {(2, 16): "Q2_K", (4, 32): "Q4_K", (5, 32): "Q5_K"}  # (bits, columns per group) -> type
KMIN_BYTES = {"Q2_K": 84, "Q4_K": 144, "Q5_K": 176}


@dataclass
class KMGrid:
    """One linear's K-quant float-minimum grid: value = (q - z) * s, z = qmin + m / s a float."""

    q: np.ndarray  # (out, in) int, in % 256 == 0
    s: np.ndarray  # (out, in // gs) float32
    z: np.ndarray  # (out, in // gs) float32
    bits: int

    @property
    def gs(self) -> int:
        return self.q.shape[1] // self.s.shape[1]

    @property
    def qtype(self) -> str | None:
        return KMIN_TYPES.get((self.bits, self.gs))

    def values(self) -> np.ndarray:
        return ((self.q - np.repeat(self.z, self.gs, 1)) * np.repeat(self.s, self.gs, 1)).astype(np.float32)

    def rows(self, fn) -> "KMGrid":
        return KMGrid(fn(self.q), fn(self.s), fn(self.z), self.bits)

    def superblocks(self):
        """(d, dmin (out, nb) fp16 numbers, k, n (out, nb, per) ints) with s = d k and m = dmin n, or None.
        s = d k is exact (moeq snapped it so: the largest k is the type's maximum); the minima m = (z - qmin) s
        carry fp32 rounding from z, so n = round(m / dmin) is accepted when it rebuilds every value of the
        super-block to within 1e-4 of its grid step."""
        kmax = 15 if self.bits == 2 else 63
        out, nb = self.q.shape[0], self.q.shape[1] // QKK
        s = self.s.reshape(out, nb, -1)  # (out, nb, per)
        m = ((self.z + (1 << (self.bits - 1))) * self.s).reshape(out, nb, -1)  # (out, nb, per) minima
        d = s.max(-1) / kmax  # (out, nb)
        dmin = (m.max(-1) / kmax).astype(np.float16).astype(np.float32)  # (out, nb)
        k = s / d[..., None]
        n = np.round(m / np.where(dmin > 0, dmin, 1)[..., None])
        if not (_fp16_exact(d) and np.array_equal(k, np.round(k)) and k.min() >= 0 and k.max() <= kmax
                and n.min() >= 0 and n.max() <= kmax):
            return None
        u = (self.q.astype(np.int32) + (1 << (self.bits - 1))).reshape(out, nb, s.shape[-1], -1)  # (out, nb, per, gs)
        rebuilt = u * (d[..., None] * k)[..., None] - (dmin[..., None] * n)[..., None]  # (out, nb, per, gs)
        step = np.maximum(s, 1e-30)[..., None]
        if np.abs(rebuilt - self.values().reshape(rebuilt.shape)).max(initial=0.0) > 1e-4 * step.max(initial=0.0):
            return None
        return d, dmin, k.astype(np.uint8), n.astype(np.uint8)


def kmgrid_from(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, args) -> KMGrid | None:
    """A float-minimum K-quant grid (``args.float_zero``, QuantArgs) on whole super-blocks, else None."""
    out, inp = q.shape
    if not args.float_zero or inp % QKK or inp % scale.shape[1]:
        return None
    g = KMGrid(q.astype(np.int16), scale.astype(np.float32), zero.astype(np.float32), args.num_bits)
    return g if g.qtype is not None else None


def fits_km(g: KMGrid, qtype: str) -> bool:
    lo = -(1 << (g.bits - 1))
    return (g.qtype == qtype and lo <= int(g.q.min()) and int(g.q.max()) < -lo
            and g.superblocks() is not None)


def _scales_k4(k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """8 6-bit scales and minima (..., 8) -> the 12 bytes ggml's get_scale_min_k4 reads (..., 12)."""
    b = np.zeros((*k.shape[:-1], 12), np.uint8)
    b[..., 0:4] = k[..., 0:4] | ((k[..., 4:8] >> 4) << 6)
    b[..., 4:8] = n[..., 0:4] | ((n[..., 4:8] >> 4) << 6)
    b[..., 8:12] = (k[..., 4:8] & 0xF) | ((n[..., 4:8] & 0xF) << 4)
    return b


def pack_km(g: KMGrid, qtype: str) -> tuple[np.ndarray, GT]:
    """Raw bytes (out, in // 256 * block bytes) of a Q2_K, Q4_K or Q5_K tensor."""
    out, inp = g.q.shape
    nb = inp // QKK
    d, dmin, k, n = g.superblocks()  # (out, nb) x2, (out, nb, per) x2
    u = (g.q.astype(np.int16) + (1 << (g.bits - 1))).astype(np.uint8).reshape(out, nb, QKK)  # (out, nb, 256)
    dm = np.concatenate([_f16_bytes(d), _f16_bytes(dmin)], -1)  # (out, nb, 4)
    if qtype == "Q2_K":
        v = u.reshape(out, nb, 2, 4, 32)  # (out, nb, h, j, l): element 128 h + 32 j + l
        qs = (v << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(-2, dtype=np.uint8)  # (out, nb, 2, 32)
        raw = np.concatenate([k | (n << 4), qs.reshape(out, nb, 64), dm], -1)  # (out, nb, 84)
        return raw.reshape(out, nb * 84), GT.Q2_K
    v = u.reshape(out, nb, 4, 2, 32)  # (out, nb, c, half, l): element 64 c + 32 half + l
    qs = ((v[..., 0, :] & 0xF) | ((v[..., 1, :] & 0xF) << 4)).reshape(out, nb, 128)  # (out, nb, 128)
    sc = _scales_k4(k, n)  # (out, nb, 12)
    if qtype == "Q4_K":
        raw = np.concatenate([dm, sc, qs], -1)  # (out, nb, 144)
        return raw.reshape(out, nb * 144), GT.Q4_K
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)  # (c, half): bit 2c + half
    qh = ((v >> 4) << shifts[..., None]).sum((-3, -2), dtype=np.uint8)  # (out, nb, 32)
    raw = np.concatenate([dm, sc, qh, qs], -1)  # (out, nb, 176)
    return raw.reshape(out, nb * 176), GT.Q5_K


def choose_any(grids: list) -> str:
    """The narrowest type every member (Grid, KGrid, KMGrid or float values) fits, by bits per weight."""
    if all(isinstance(g, KGrid) for g in grids):
        return next((t for t in ("Q3_K", "Q6_K") if all(fits_k(g, t) for g in grids)), "F32")
    if all(isinstance(g, KMGrid) for g in grids):
        t = grids[0].qtype
        return t if t is not None and all(fits_km(g, t) for g in grids) else "F32"
    if all(isinstance(g, Grid) for g in grids):
        return choose(grids)
    return "F32"


def pack_any(g, qtype: str) -> tuple[np.ndarray, GT]:
    if qtype == "F32":
        return (g.values() if isinstance(g, GRIDS) else np.asarray(g, np.float32)), GT.F32
    if isinstance(g, KMGrid):
        return pack_km(g, qtype)
    return pack_k(g, qtype) if isinstance(g, KGrid) else pack(g, qtype)


GRIDS = (Grid, KGrid, KMGrid)


def pack_stack(grids: list[Grid], qtype: str) -> tuple[np.ndarray, GT]:
    """Stacked experts (E, out, ...) of one type."""
    parts = [pack_any(g, qtype) for g in grids]
    return np.stack([p for p, _ in parts]), parts[0][1]
