"""GPTAQ (--method gptaq / --gptaq): the target is the least-squares fit of the FP model's outputs, and the FP
rows are paired with the quantized rows token by token (dense linears and routed experts alike)."""

from __future__ import annotations

import pytest
import torch

from moeq.config import BitPlan, CalibSpec, QuantConfig
from moeq.pipeline import quantize
from moeq.quant.primitives import QuantArgs
from moeq.solvers.gptq import gptaq_target

W3 = QuantArgs(3, 32, True)


def test_target_is_the_least_squares_fit_of_the_fp_outputs():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 16, generator=g)  # (out, in)
    Xq = torch.randn(200, 16, generator=g)  # quantized-stream rows (n, in)
    X = Xq + 0.3 * torch.randn(200, 16, generator=g)  # FP rows of the same tokens
    H, C = Xq.T @ Xq / 200, (X - Xq).T @ Xq / 200  # (in, in)
    Wp = gptaq_target(W, H, C, damp=0.0)
    ref = torch.linalg.lstsq(Xq.double(), (X @ W.T).double()).solution.T  # argmin_Q ||X W^T - Xq Q^T||
    assert torch.allclose(Wp.double(), ref, atol=1e-4)
    assert torch.allclose(gptaq_target(W, H, torch.zeros_like(C)), W)  # identical streams: GPTQ's own target


def _results(ckpt, method, plan):
    cfg = QuantConfig(method=method, plan=plan, calib=CalibSpec("wikitext2", nsamples=4, seqlen=32))
    rep, model = quantize(str(ckpt), cfg, None, skip_eval=True, return_model=True)
    return {r["name"]: r for r in rep["modules"]}, model


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_fp_rows_are_paired_with_the_quantized_rows(arch, tiny_ckpt):
    """Attention in full precision: block 0's experts read the same hidden states in both streams, so their
    gate/up (first group) get GPTQ's own result only if every routed row is paired with its own token's FP
    row; their down projections (inputs after quantized gate/up) and block 1 (quantized inputs) differ."""
    plan = BitPlan(default=W3, rules=[(r".*self_attn\..*", None)])
    ckpt = tiny_ckpt(arch)
    _, ref = _results(ckpt, "gptq", plan)
    _, ours = _results(ckpt, "gptaq", plan)
    sd_ref, sd = ref.state_dict(), ours.state_dict()
    b0 = [k for k in sd if k.startswith("model.layers.0.mlp.experts")]
    up = [k for k in b0 if "down" not in k]
    down = [k for k in b0 if "down" in k]
    assert up and down
    for k in up:
        assert torch.equal(sd[k], sd_ref[k]), k
    assert any(not torch.equal(sd[k], sd_ref[k]) for k in down)
    assert any(not torch.equal(sd[k], sd_ref[k]) for k in sd if k.startswith("model.layers.1.mlp"))


def test_gptaq_refuses_non_gptq_methods(tiny_ckpt):
    cfg = QuantConfig(method="awq", gptaq=True, plan=BitPlan(default=W3), calib=CalibSpec("wikitext2", 2, 32))
    with pytest.raises(ValueError, match="--gptaq changes GPTQ's target"):
        quantize(str(tiny_ckpt("qwen2_moe")), cfg, None, skip_eval=True)
