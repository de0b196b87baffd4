"""The method registry is the one seam: the API and the CLI run exactly the same thing for every method, and a
new method is one registration plus one solver function."""

import json

import pytest
import torch
from safetensors import safe_open

import moeq
from moeq.cli import main
from moeq.methods import ALIASES, METHODS, Method, get_method, register_method
from moeq.quant.primitives import compute_qparams, quantize as grid_quantize
from moeq.solvers.base import QuantResult
from moeq.solvers.blocktune import TuneKnobs
from moeq.solvers.registry import SOLVERS, Solver, register_solver

MODEL = "mixtral-tiny"


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({(f.name, k): h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_api_and_cli_write_byte_identical_tensors(method, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEQ_CACHE", str(tmp_path / "cache"))  # EBSS sets are generated fresh, then shared
    # the block tuner's steps cut to 10 (for every method: the others ignore them) to keep the test fast
    api = moeq.quantize(MODEL, moeq.QuantConfig(method=method, plan=moeq.BitPlan(moeq.QuantArgs(num_bits=4,
                        group_size=128)), calib=moeq.CalibSpec(nsamples=2, seqlen=32, seed=0),
                        tune=TuneKnobs(steps=10)), tmp_path / "api", skip_eval=True)
    code = main(["quantize", MODEL, "--method", method, "--bits", "4", "--group-size", "128", "--nsamples", "2",
                 "--seqlen", "32", "--seed", "0", "--tune-steps", "10", "--skip-eval", "--out", str(tmp_path / "cli")])
    assert code == 0
    a, b = _tensors(tmp_path / "api"), _tensors(tmp_path / "cli")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert api["quant"] == cli["quant"] and api["method"] == cli["method"] == method
    m = get_method(method)
    assert cli["quant"]["rotate"] == m.rotate and cli["quant"]["agq"] == m.agq
    assert (cli["calibration"] is None) == (m.calib is None)
    assert m.search is None or any(k[0] == "transforms.safetensors" for k in b)


def test_omniquant_is_an_alias_of_lwc_and_says_so(tmp_path):
    assert ALIASES["omniquant"] == "lwc"
    rep = moeq.quantize(MODEL, moeq.QuantConfig(method="omniquant", calib=moeq.CalibSpec(nsamples=2, seqlen=32)),
                        None, skip_eval=True)
    assert rep["method"] == "lwc" and any("LWC only" in n or "no learnable equivalent" in n for n in rep["notes"])


def test_moeq_methods_lists_every_method_on_one_line(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(":")[0].split(" ")[0] for ln in lines] == list(METHODS)


def _toy(W, H, args, opts, clips):
    """Round to nearest on a grid twice as coarse as min-max (the scales doubled): easy to check independently."""
    out = []
    for w in W:  # (out, in)
        scale, zero = compute_qparams(w, args, opts.scale_dtype)
        scale = scale * 2
        out.append(QuantResult(grid_quantize(w, scale, zero, args), scale, zero, args))
    return out


def test_a_new_method_is_one_registration_and_one_solver(tmp_path, tiny_ckpt):
    register_solver(Solver("toy", _toy, needs_hessian=False, summary="RTN on a doubled grid"))
    register_method(Method("toy", "a doubled RTN grid", "-", solver="toy", calib=None))
    try:
        d = tiny_ckpt("qwen3_moe")
        assert main(["quantize", str(d), "--method", "toy", "--group-size", "32", "--skip-eval", "--out",
                     str(tmp_path / "o")]) == 0
        rep = json.loads((tmp_path / "o" / "report.json").read_text())
        assert rep["method"] == "toy" and {r["solver"] for r in rep["modules"]} == {"toy"}
        with safe_open(str(d / "model.safetensors"), "pt") as h:
            W = h.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
        with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as h:
            got = h.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").float()
        amax = W.reshape(W.shape[0], -1, 32).abs().amax(-1)  # (out, G): an independent symmetric grid
        want = (amax / 7.5).to(torch.bfloat16).float() * 2
        assert torch.equal(got, want.to(torch.bfloat16).float())
    finally:
        METHODS.pop("toy")
        SOLVERS.pop("toy")
