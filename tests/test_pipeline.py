"""End to end on tiny random models of every registry architecture: quantize -> export -> reload."""

import json

import pytest
import torch
import transformers as T

from conftest import ARCHS, tiny_model
from moeq.models.adapter import ModelAdapter
from moeq.models.loading import Loaded, cast_floating, load_model
from moeq.config import BitPlan, CalibSpec, GPTQKnobs, QuantConfig
from moeq.pipeline import quantize, quantize_loaded
from moeq.quant.primitives import QuantArgs

IDS = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(1))


def cfg(method="gptq", bits=4, gs=32, sym=True, act_order=False, mse_clip=False, **kw):
    return QuantConfig(method=method, plan=BitPlan(default=QuantArgs(bits, gs, sym)),
                       calib=CalibSpec("wikitext2", nsamples=kw.pop("nsamples", 8), seqlen=64),
                       gptq=GPTQKnobs(act_order=act_order), mse_clip=mse_clip, **kw)


def reload_logits(d):
    """Plain transformers load (checkpoint dtype, bf16); the first forward decompresses the packed
    linears, then the model is computed in fp32 like moeq's in-memory model."""
    m = T.AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        m(input_ids=IDS[:, :4])
        cast_floating(m, torch.float32)
        return m(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_export_roundtrip(arch, tiny_ckpt, tmp_path):
    rep, m = quantize(str(tiny_ckpt(arch)), cfg(), tmp_path / "out", skip_eval=True, return_model=True)
    with torch.no_grad():
        ours = m(input_ids=IDS).logits
    torch.testing.assert_close(reload_logits(tmp_path / "out"), ours, rtol=1e-4, atol=1e-4)
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["method"] == "gptq" and on_disk["avg_bits"] == 4.0
    assert {r["solver"] for r in on_disk["modules"]} <= {"gptq", "rtn"}
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert "lm_head" in qc["ignore"]


def test_every_expert_gets_calibrated_with_coverage_all(tiny_ckpt, tmp_path):
    rep = quantize(str(tiny_ckpt("qwen2_moe")), cfg(expert_coverage="all", nsamples=4), tmp_path / "o",
                   skip_eval=True)
    experts = [r for r in rep["modules"] if r["role"] == "expert"]
    assert experts and all(r["rows"] == 4 * 64 for r in experts)  # every token reached every expert
    assert all(r["solver"] == "gptq" and r["fallback"] is None for r in experts)
    routed = [r["tokens"] for r in experts]
    assert sum(routed) == (4 * 64) * 2 * 2 * 3  # tokens x top-2 x 2 MoE layers x 3 projections


def _kill_expert(router, dead: int):
    """Mixtral router that never selects expert ``dead``."""
    def forward(hidden_states):
        x = hidden_states.reshape(-1, router.hidden_dim)
        logits = torch.nn.functional.linear(x, router.weight)
        logits[:, dead] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        w, idx = torch.topk(probs, router.top_k, dim=-1)
        return logits, w / w.sum(-1, keepdim=True), idx
    router.forward = forward


@pytest.mark.parametrize("fallback", ["rtn", "avg-hessian"])
def test_dead_expert_falls_back_and_stays_finite(fallback, tokenizer):
    m = tiny_model("mixtral", seed=5)
    ad = ModelAdapter.for_model(m)
    _kill_expert(ad.router(0), 3)
    loop = quantize_loaded(Loaded(m, tokenizer, "tiny", torch.bfloat16), cfg(fallback=fallback), copy_model=False).loop
    ad.unfuse()
    for p in ("gate_proj", "up_proj", "down_proj"):
        row = loop.rows[f"model.layers.0.mlp.experts.3.{p}"]
        assert row["fallback"] == fallback and row["tokens"] == 0
        assert row["solver"] == ("rtn" if fallback == "rtn" else "gptq")
        assert loop.rows[f"model.layers.0.mlp.experts.2.{p}"]["fallback"] is None
    assert loop.expert_tokens[0][3] == 0 and min(loop.expert_tokens[1]) > 0
    for name, p in m.named_parameters():
        assert torch.isfinite(p).all(), name
    ex = ad.experts(0)[3]
    for lin in (ex.gate_proj, ex.up_proj, ex.down_proj):
        assert (lin.weight.abs().sum(1) > 0).all()  # nothing wiped
        assert torch.isfinite(loop.results[f"model.layers.0.mlp.experts.3.{lin is ex.gate_proj and 'gate_proj' or lin is ex.up_proj and 'up_proj' or 'down_proj'}"].scale).all()


@pytest.mark.parametrize("arch", ["qwen3_moe", "llama"])
@pytest.mark.parametrize("c", [cfg("rtn", 3, -1), cfg("gptq", 4, 32, sym=False), cfg("gptq", 8, -1, act_order=True),
                               cfg("gptq", 2, 32, mse_clip=True)], ids=["rtn3c", "asym4", "w8c-actorder", "w2-mse"])
def test_grids_roundtrip(arch, c, tiny_ckpt, tmp_path):
    rep, m = quantize(str(tiny_ckpt(arch)), c, tmp_path / "o", skip_eval=True, return_model=True)
    with torch.no_grad():
        ours = m(input_ids=IDS).logits
        again = load_model(str(tmp_path / "o")).model(input_ids=IDS).logits  # moeq's exact loader
    torch.testing.assert_close(again, ours, rtol=1e-5, atol=1e-5)
    if c.plan.default.symmetric:
        # transformers' own loader; it cannot read packed zero points (asymmetric grids: moeq's loader)
        torch.testing.assert_close(reload_logits(tmp_path / "o"), ours, rtol=1e-4, atol=1e-4)


def test_report_has_losses_and_stage_times(tiny_ckpt, tmp_path):
    g = quantize(str(tiny_ckpt("olmoe")), cfg("gptq", 3, 32, nsamples=16), tmp_path / "g", skip_eval=True)
    assert all(r["loss"] >= 0 for r in g["modules"]) and "gptq" in {r["solver"] for r in g["modules"]}
    assert g["seconds"]["quantize"] > 0 and set(g["seconds"]) >= {"calibration", "quantize", "evaluate", "export", "total"}


def test_one_pass_per_block_differs_only_after_the_first_group(tiny_ckpt, tmp_path):
    """--no-true-sequential: every linear is calibrated on the block's unquantized inputs in one pass.
    The first group (q,k,v) sees the same inputs either way, so its integers are identical; later groups
    see inputs that no longer reflect the quantized attention, so theirs differ."""
    d = str(tiny_ckpt("mixtral"))
    seq = quantize(d, cfg(nsamples=4), tmp_path / "s", skip_eval=True)
    one = quantize(d, cfg(nsamples=4, true_sequential=False), tmp_path / "o", skip_eval=True)
    assert [r["name"] for r in seq["modules"]] == [r["name"] for r in one["modules"]]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "s" / "model.safetensors"), load_file(tmp_path / "o" / "model.safetensors")
    packed = [k for k in a if k.endswith("weight_packed")]
    same = {k for k in packed if torch.equal(a[k], b[k])}
    qkv = {k for k in packed if "layers.0.self_attn." in k and k.split(".")[-2] in ("q_proj", "k_proj", "v_proj")}
    assert qkv and qkv <= same  # block 0's first group: identical inputs, identical integers
    later = {k for k in packed if "layers.0." in k} - qkv  # o_proj and the experts of block 0
    assert later and later - same  # they saw inputs with or without the quantized attention
