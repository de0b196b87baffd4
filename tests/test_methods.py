"""The searched methods end to end on tiny random models: AWQ, MoEQuant+, OmniQuant-LWC, QuaRot+GPTQ,
MoEQuant++ and W4A4. Weight-only exports reload in transformers with the in-memory logits; search
results (scales, clips, rotations) replay exactly from transforms.safetensors."""

import json

import pytest
import torch
import transformers as T

from conftest import ARCHS, _randomize, tiny_config, tiny_deepseek_moe
from moeq.cli import build_parser, main
from moeq.flags import quant_config
from moeq.config import AWQKnobs, BitPlan, CalibSpec, LWCKnobs, QuantConfig
from moeq.methods import get_method, resolve_config
from moeq.models.adapter import ModelAdapter
from moeq.models.loading import Loaded, load_model
from moeq.pipeline import quantize, quantize_loaded
from moeq.quant.act import ActQuantArgs, fake_quant_tokens
from moeq.quant.primitives import QuantArgs, fake_quantize
from moeq.solvers.awq import channel_mean, search_clip, search_scale
from moeq.solvers.lwc import learn_clipping
from moeq.solvers.rtn import rtn
from moeq.transforms.artifact import Transforms, apply_transforms
from test_pipeline import IDS, reload_logits

NEW = ["awq", "moequant+", "lwc", "quarot-gptq", "moequant++"]
# every new method once, on five architectures (llama runs W4A4 below; the full matrix is the slow CLI test)
PAIRS = [("deepseek_v3", "awq"), ("qwen2_moe", "moequant+"), ("mixtral", "lwc"), ("olmoe", "quarot-gptq"),
         ("qwen3_moe", "moequant++")]


def cfg(method, calib="wikitext2", **kw):
    """The method's registry defaults (resolved by the library), small search grids, wikitext2 calibration."""
    return QuantConfig(method=method, plan=BitPlan(default=QuantArgs(4, 32, True)), calib=CalibSpec(calib, 2, 32),
                       awq=AWQKnobs(grid=4, clip_grid=5), lwc=LWCKnobs(epochs=2), **kw)


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory, tokenizer):
    """Tied embeddings, as in both bundled models: rotation must untie them in the export."""
    def make(arch):
        d = tmp_path_factory.mktemp(f"tied-{arch}")
        c = tiny_config(arch)
        c.tie_word_embeddings = True
        m = _randomize(T.AutoModelForCausalLM.from_config(c, dtype=torch.float32), 0).eval()
        m.tie_weights()
        m.to(torch.bfloat16).save_pretrained(d)
        tokenizer.save_pretrained(d)
        return d
    return make


def _replayed_weights(ckpt, tr: Transforms, names, args):
    """Fresh FP model + the saved transforms + RTN with the saved clips: what the method should have written."""
    m = load_model(str(ckpt)).model
    ad = ModelAdapter.for_model(m).unfuse()
    apply_transforms(ad, tr)
    return {n: rtn(ad.module(n).weight.data, args, torch.bfloat16, clip=tr.clips.get(n)).dequantize().to(torch.bfloat16)
            for n in names}


@pytest.mark.parametrize("arch,method", PAIRS, ids=[f"{a}-{m}" for a, m in PAIRS])
def test_method_exports_reload_with_identical_logits(arch, method, tiny_ckpt, tied_ckpt, tmp_path):
    ckpt = tied_ckpt(arch) if get_method(method).rotate else tiny_ckpt(arch)
    rep, m = quantize(str(ckpt), cfg(method), tmp_path / "o", skip_eval=True, return_model=True)
    with torch.no_grad():
        ours = m(input_ids=IDS).logits
    torch.testing.assert_close(reload_logits(tmp_path / "o"), ours, rtol=1e-4, atol=1e-4)
    tr = Transforms.load(tmp_path / "o" / "transforms.safetensors")
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    if get_method(method).rotate:
        assert tr.rotation is not None and rep["transforms"]["rotation"]["kind"] == "hadamard"
        assert saved["tie_word_embeddings"] is False  # rotated embeddings and head differ: exported untied
        assert any("untied" in n for n in rep["notes"])
    if method in ("awq", "moequant+", "lwc"):
        assert tr.clips and (method == "lwc" or tr.smooth)
        ad = ModelAdapter.for_model(m).unfuse()
        want = _replayed_weights(ckpt, tr, [r["name"] for r in rep["modules"]], QuantArgs(4, 32, True))
        for n, W in want.items():
            assert torch.equal(ad.module(n).weight.data.to(torch.bfloat16), W), n
        ad.refuse()
    if method in ("awq", "moequant+"):  # searched: never worse than alpha = 0 (no scaling) on its own objective
        assert all(s.info["loss"] <= s.info["loss_alpha0"] for s in tr.smooth)
        routers = [s for s in tr.smooth if any(c.endswith(".gate") for c in s.consumers)]
        assert not ModelAdapter.for_model(m).spec.moe or routers  # router compensated with the MoE scale


def test_remote_code_layout_runs_affinity_awq(tokenizer):
    """DeepSeek-MoE-16B-style per-expert ModuleList with a moe_infer dispatch (no checkpoint: in memory;
    its rotation invariance is in test_transforms)."""
    loaded = Loaded(tiny_deepseek_moe(), tokenizer, "tiny-deepseek", torch.float32)
    q = quantize_loaded(loaded, cfg("moequant+"))
    assert len(q.loop.results) == 3 * 4 + 2 * (6 + 1) * 3 + 3  # attention, experts + shared, dense MLP
    assert any(s.prev == "post_attention_layernorm" and "mlp.gate" in s.consumers for s in q.method.transforms.smooth)
    with torch.no_grad():
        assert torch.isfinite(q.model(input_ids=IDS).logits).all()


@pytest.mark.parametrize("method,calib,agq,rotate", [("awq", "wikitext2", False, False), ("omniquant", "wikitext2", False, False),
                                                    ("moequant+", "ebss", True, False), ("quarot-gptq", "wikitext2", False, True),
                                                    ("moequant++", "ebss", True, True)])
def test_cli_flags_resolve_to_the_method_defaults(method, calib, agq, rotate):
    c, _ = resolve_config(quant_config(build_parser().parse_args(["quantize", "--out", "x", "--method", method])))
    assert (c.calib.source, c.agq, c.rotate) == (calib, agq, rotate)
    c, _ = resolve_config(quant_config(build_parser().parse_args(
        ["quantize", "--out", "x", "--method", method, "--calib", "c4", "--no-agq"])))
    assert (c.calib.source, c.agq) == ("c4", False)  # explicit flags win
    dense, notes = resolve_config(QuantConfig(method=method), is_moe=False)
    assert dense.calib.source == "wikitext2" and (calib != "ebss" or notes)  # no experts to balance: no EBSS


def test_cli_runs_and_w4a4_is_fake_quant_only(tiny_ckpt, tmp_path, capsys):
    d = tiny_ckpt("mixtral")
    base = ["quantize", str(d), "--group-size", "32", "--nsamples", "4", "--seqlen", "32", "--skip-eval", "--awq-grid", "4"]
    assert main(base + ["--out", str(tmp_path / "p"), "--method", "moequant+", "--calib", "wikitext2"]) == 0
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["quant"]["agq"] and rep["transforms"]["smooth_scales"] > 0 and rep["transforms"]["clips"] > 0
    # W4A4 with the online Hadamard: evaluated in fake quant, never exported as a checkpoint that runs wrongly
    code = main(base + ["--out", str(tmp_path / "a"), "--method", "quarot-gptq", "--act-bits", "4"])
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "a"
    assert not (out / "model.safetensors").exists() and (out / "transforms.safetensors").exists()
    rep = json.loads((out / "report.json").read_text())
    assert any("no checkpoint written" in n for n in rep["notes"]) and rep["transforms"]["online_hadamard"] == 8


def test_w4a4_without_online_hadamard_exports_its_activation_scheme(tiny_ckpt, tmp_path):
    c = cfg("quarot-gptq", act=ActQuantArgs(4), online_hadamard=False)
    rep, m = quantize(str(tiny_ckpt("llama")), c, tmp_path / "o", skip_eval=True, return_model=True)
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    act = qc["config_groups"]["group_0"]["input_activations"]
    assert act["num_bits"] == 4 and act["strategy"] == "token" and act["dynamic"] and act["symmetric"]
    with torch.no_grad():
        a4 = m(input_ids=IDS).logits
        hooked = [mod for mod in m.modules() if mod._forward_pre_hooks]
        for mod in hooked:
            mod._forward_pre_hooks.clear()
        w4 = m(input_ids=IDS).logits
    assert len(hooked) == 14 and (a4 - w4).abs().max() > 1e-3  # activation quantization is really applied
    # transformers reads the weights (dequantize=True drops the activation scheme): W4 logits
    r = T.AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32,
                                               quantization_config=T.CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        torch.testing.assert_close(r(input_ids=IDS).logits, w4, rtol=1e-4, atol=1e-4)


def test_act_fake_quant_matches_the_weight_grid():
    x = torch.randn(5, 64)
    a = ActQuantArgs(4)
    # per-token symmetric = moeq's symmetric weight grid applied to each row (per channel)
    torch.testing.assert_close(fake_quant_tokens(x, a), fake_quantize(x, QuantArgs(4, -1, True)))
    clipped = fake_quant_tokens(x, ActQuantArgs(4, 0.5)).abs().amax(-1)  # (5,) at most 8 levels of amax/2 / 7.5
    assert clipped.le(x.abs().amax(-1) * 0.5 * 8 / 7.5 + 1e-6).all()


def test_awq_search_units():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=g) * torch.linspace(0.1, 8, 32)  # (n, d) outlier channels
    W = torch.randn(16, 32, generator=g)
    args = QuantArgs(3, 16, True)
    c = torch.rand(256, generator=g)
    assert not torch.allclose(channel_mean([X], [c]), channel_mean([X]))  # affinity weighting is used

    def loss(W_hat):
        return float((X @ (W_hat["w"] - W).T).pow(2).mean())
    s, info = search_scale(channel_mean([X]), {"w": W}, lambda n: args, loss, grid=10)
    assert info["loss"] <= info["loss_alpha0"] and info["alpha"] > 0  # outliers make scaling pay off
    p = search_clip(W, X, args, grid=10)
    assert p.shape == (16, 2) and (p <= 1).all() and (p >= 0.5).all()
    err = lambda clip: float((X @ (rtn(W, args, clip=clip).dequantize() - W).T).pow(2).sum())
    assert err((p, p)) <= err((torch.ones_like(p), torch.ones_like(p))) + 1e-6


@pytest.mark.parametrize("args", [QuantArgs(3, 32, False), QuantArgs(4, 32, True), QuantArgs(4, 32, False, ggml=True)])
def test_lwc_trains_on_the_grid_it_exports(args):
    """LWC's differentiable fake quantization is the exported grid itself (scales rounded to the storage dtype):
    the clipped RTN result that export writes dequantizes to exactly what LWC trained on."""
    from moeq.solvers.lwc import lwc_fake_quant

    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 64, generator=g)
    lo, hi = torch.randn(16, 2, generator=g) + 2, torch.randn(16, 2, generator=g) + 2  # clip logits
    trained = lwc_fake_quant(W, args, lo, hi, torch.bfloat16)
    exported = rtn(W, args, torch.bfloat16, clip=(torch.sigmoid(lo), torch.sigmoid(hi))).dequantize()
    assert torch.equal(trained, exported)
    lo.requires_grad_(True)
    lwc_fake_quant(W, args, lo, hi, torch.bfloat16).pow(2).sum().backward()
    assert lo.grad is not None and lo.grad.abs().sum() > 0  # the roundings pass gradients straight through


def test_lwc_learns_clips_that_lower_the_output_error():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 64, generator=g)
    W[0, 0] = 12.0  # an outlier weight that min-max ranges waste levels on
    X = torch.randn(128, 64, generator=g)
    args = QuantArgs(3, 32, False)
    batches = list(X.split(32))
    clips, info = learn_clipping({"w": W}, lambda n: args, batches,
                                 lambda Wh, x: (x @ (Wh["w"] - W).T).pow(2).mean(), epochs=5, lr=5e-2)
    lo, hi = clips["w"]
    assert info["loss_last_epoch"] < info["loss_first_epoch"]
    assert lo.shape == (32, 2) and ((lo > 0) & (lo <= 1) & (hi > 0) & (hi <= 1)).all()
    err = lambda clip: float((X @ (rtn(W, args, clip=clip).dequantize() - W).T).pow(2).sum())
    assert err((lo, hi)) < err(None)


@pytest.mark.slow  # the full method x architecture CLI matrix: 30 runs, about 30 s on 1 thread
@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("arch", ARCHS)
def test_cli_every_method_every_arch(arch, method, tiny_ckpt, tmp_path, capsys):
    code = main([str(a) for a in ["quantize", tiny_ckpt(arch), "--out", tmp_path / "o", "--method", method,
                                  "--group-size", "32", "--nsamples", "2", "--seqlen", "32", "--skip-eval",
                                  "--awq-grid", "4", "--lwc-epochs", "1"]])
    assert code == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["method"] == method and (tmp_path / "o" / "model.safetensors").exists()
