"""Integer grid primitives, RTN and the GPTQ solver on random weights and Hessians."""

import pytest
import torch

from moeq.quant.primitives import QuantArgs, compute_qparams, dequantize, fake_quantize, quantize, search_clip
from moeq.solvers.gptq import gptq
from moeq.solvers.rtn import rtn

g = torch.Generator().manual_seed(0)


def rand_w(out=48, inp=256):
    return torch.randn(out, inp, generator=g)


def rand_h(inp=256, n=2048, corr=True):
    X = torch.randn(n, inp, generator=g)
    if corr:  # correlated, unequal-scale inputs like real activations
        X = X @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g)) * torch.rand(inp, generator=g) * 3
    return X.T @ X / n


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_grid_range_and_roundtrip(bits, gs, sym):
    a = QuantArgs(bits, gs, sym)
    W = rand_w()
    s, z = compute_qparams(W, a)
    q = quantize(W, s, z, a)
    assert q.dtype == torch.int8 and q.min() >= a.qmin and q.max() <= a.qmax
    Wh = dequantize(q, s, z, a)
    assert torch.equal(quantize(Wh, s, z, a), q)  # dequantized weights re-quantize to the same ints
    # error bounded by half a step per group (plus clamping of the symmetric max)
    step = s.repeat_interleave(W.shape[1] // s.shape[1], 1)
    assert ((W - Wh).abs() <= step * (1.0 if sym else 0.5) + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_full_range_grid_matches_a_reference_and_uses_every_integer(bits):
    """--full-range (auto-round's / llama.cpp Q4_0's rule), against a per-group loop: the value of largest
    magnitude e sets scale = -e / 2^(b-1), so e lands exactly on qmin; then q = clamp(round(w / scale))."""
    W = rand_w(16, 128)
    W[::2] -= 0.5  # rows whose groups lean negative and rows that lean positive: both signs of scale
    W[1::2] += 0.5
    a = QuantArgs(bits, 32, True, full_range=True)
    s, z = compute_qparams(W, a)
    q = quantize(W, s, z, a)
    for r in range(W.shape[0]):
        for gi in range(4):
            w = W[r, gi * 32:(gi + 1) * 32]
            e = w[w.abs().argmax()]
            ref_s = -e / 2 ** (bits - 1)
            ref_q = torch.clamp(torch.round(w / ref_s), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
            assert torch.allclose(s[r, gi], ref_s) and torch.equal(q[r, gi * 32:(gi + 1) * 32].float(), ref_q)
    assert (s < 0).any() and (s > 0).any() and torch.equal(z, torch.zeros_like(z))
    Wh = dequantize(q, s, z, a)
    e_idx = W.reshape(16, 4, 32).abs().argmax(-1, keepdim=True)  # (16, 4, 1)
    assert torch.allclose(Wh.reshape(16, 4, 32).gather(-1, e_idx), W.reshape(16, 4, 32).gather(-1, e_idx))
    assert int(q.min()) == a.qmin  # the whole signed range is used
    half = fake_quantize(W, QuantArgs(bits, 32, True))
    if bits <= 3:  # the half-range grid wastes a level: clearly worse at 2-3 bits
        assert (Wh - W).pow(2).mean() < 0.8 * (half - W).pow(2).mean()
    with pytest.raises(ValueError, match="--full-range"):
        QuantArgs(4, 32, False, full_range=True)
    assert QuantArgs(4, 32, True, full_range=True).label() == "w4g32f"


def test_zero_rows_and_constant_rows_give_finite_scales():
    W = torch.zeros(4, 64)
    W[1] = 3.0
    for a in (QuantArgs(4, 32, True), QuantArgs(4, 32, False)):
        s, z = compute_qparams(W, a)
        assert torch.isfinite(s).all() and (s > 0).all()
        Wh = fake_quantize(W, a)
        assert torch.equal(Wh[0], W[0]) and torch.isfinite(Wh).all()  # zero rows stay exactly zero
        assert (Wh[1] - W[1]).abs().max() <= s[1].max() + 1e-6


def test_bits_and_group_validation():
    for bad in (1, 9, 0):
        with pytest.raises(ValueError, match="2..8"):
            QuantArgs(bad)
    with pytest.raises(ValueError, match="does not divide"):
        QuantArgs(4, 96).check_width(256, "x")


def test_scales_are_rounded_to_the_storage_dtype():
    s, _ = compute_qparams(rand_w(), QuantArgs(4, 128), scale_dtype=torch.bfloat16)
    assert torch.equal(s, s.to(torch.bfloat16).float())


def _clip_error(Wg: torch.Tensor, p: float, bits: int, sym: bool) -> torch.Tensor:
    """sum |w - q(w)|^2.4 per (row, group) of Wg (out, G, gs) on the grid of range [p min, p max], in fp64,
    written out here independently of moeq.quant."""
    Wg = Wg.double()
    lo, hi = (Wg.amin(-1) * p).clamp(max=0), (Wg.amax(-1) * p).clamp(min=0)  # (out, G)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if sym:
        scale, zero = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp_min(1e-10), torch.zeros_like(lo)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-10)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    q = (torch.round(Wg / scale[..., None]) + zero[..., None]).clamp(qmin, qmax)
    return ((q - zero[..., None]) * scale[..., None] - Wg).abs().pow(2.4).sum(-1)  # (out, G)


@pytest.mark.parametrize("gs, sym", [(-1, True), (32, True), (32, False)])
def test_mse_clip_finds_the_grid_minimum_and_beats_minmax_on_outliers(gs, sym):
    """search_clip's shrink per (row, group) reaches the least error over its grid p = 1 - i/80,
    i < 64 (a brute force here), and with outliers most groups are strictly better than min-max (p = 1)."""
    W = rand_w(32, 128)
    W[torch.arange(32), torch.randint(0, 128, (32,), generator=g)] *= 12  # one outlier per row
    a = QuantArgs(3, gs, sym)
    Wg = W.reshape(32, a.num_groups(128), -1)  # (out, G, gs)
    shrink = search_clip(W, a)  # (out, G)
    grid = torch.tensor([1 - i / 80 for i in range(64)], dtype=torch.float64)
    idx = (shrink.double()[..., None] - grid).abs().argmin(-1)  # (out, G) grid point of each chosen shrink
    assert torch.allclose(grid[idx], shrink.double(), atol=1e-6)  # chosen on the grid
    errs = torch.stack([_clip_error(Wg, float(p), 3, sym) for p in grid])  # (64, out, G)
    brute, chosen = errs.amin(0), errs.gather(0, idx[None])[0]  # least error on the grid, error of the choice
    assert torch.allclose(chosen, brute, rtol=1e-5)
    minmax = _clip_error(Wg, 1.0, 3, sym)
    assert chosen.sum() < 0.95 * minmax.sum() and (chosen < minmax - 1e-9).float().mean() > 0.5


def test_gptq_beats_rtn_on_layer_loss():
    """On correlated inputs GPTQ's layer loss tr((W - W_hat) H (W - W_hat)^T), computed here from each
    solver's integers and grid, is clearly below RTN's on the same grid settings."""
    gen = torch.Generator().manual_seed(7)
    n, inp, out = 1024, 128, 64
    X = torch.randn(n, inp, generator=gen) @ torch.randn(inp, inp, generator=gen)  # X = Z A: correlated inputs
    H = X.T @ X / n  # (in, in)
    W = torch.randn(out, inp, generator=gen)
    a = QuantArgs(3, 32, True)

    def loss(r) -> float:
        s, z = (t.repeat_interleave(32, 1).double() for t in (r.scale, r.zero))  # (out, in)
        assert r.q.min() >= a.qmin and r.q.max() <= a.qmax
        D = (r.q.double() - z) * s - W.double()  # (out, in)
        return float(torch.trace(D @ H.double() @ D.T))

    l_gptq, l_rtn = loss(gptq(W, H, a, blocksize=32)[0]), loss(rtn(W, a))  # blocksize < in: lazy updates too
    assert l_gptq < 0.7 * l_rtn


@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_loss_not_above_rtn(gs, bits, act_order):
    W, H = rand_w(), rand_h()
    a = QuantArgs(bits, gs, True)
    r = gptq(W, H, a, act_order=act_order)[0]
    base = rtn(W, a, H=H)
    assert r.loss <= base.loss
    assert r.loss < 0.9 * base.loss  # on correlated inputs GPTQ is clearly better


def test_identity_hessian_gives_rtn():
    W = rand_w()
    a = QuantArgs(4, 128, True)
    r = gptq(W, torch.eye(W.shape[1]), a)[0]
    base = rtn(W, a)
    assert torch.equal(r.q, base.q) and torch.equal(r.scale, base.scale)


def test_act_order_dequantizes_in_original_column_order():
    W, H = rand_w(), rand_h()
    a = QuantArgs(4, 64, True)
    r = gptq(W, H, a, act_order=True)[0]
    assert r.g_idx is None  # static groups: consecutive groups of the original columns
    Wh = r.dequantize()
    # the recomputed loss from the original-order dequantization equals the solver's loss
    D = Wh - W
    assert torch.isclose(((D @ H) * D).sum(), torch.tensor(r.loss), rtol=1e-4)
    # static groups: scales are those of the original columns' groups
    s, _ = compute_qparams(W, a)
    assert torch.allclose(r.scale, s)


def test_batched_equals_one_by_one():
    Ws = torch.stack([rand_w(32, 128) for _ in range(5)])
    Hs = torch.stack([rand_h(128, 512) for _ in range(5)])
    a = QuantArgs(4, 64, True)
    batched = gptq(Ws, Hs, a)
    for b in range(5):
        single = gptq(Ws[b], Hs[b], a)[0]
        assert torch.equal(batched[b].q, single.q)
        assert abs(batched[b].loss - single.loss) <= 1e-4 * max(1.0, single.loss)


def test_dead_columns_are_not_wiped_and_singular_hessians_get_more_damping():
    W = rand_w(16, 64)
    X = torch.randn(8, 64, generator=g)
    X[:, :10] = 0  # never-active inputs
    H = X.T @ X / 8  # rank 8: singular
    r = gptq(W, H, QuantArgs(4, 32, True), damp=1e-8)[0]
    Wh = r.dequantize()
    assert torch.isfinite(Wh).all()
    assert (Wh[:, :10].abs().sum(0) > 0).all()  # dead columns quantized, not zeroed
    assert r.info["dead_columns"] == 10
