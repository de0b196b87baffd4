"""``moeq check-serving``: an export is checked against each engine's loading rules (read from vLLM 0.33, SGLang
0.5.23 and transformers 5.24), every violation names the module and the fix, exit status 1 on any."""

import json

import pytest

from moeq.cli import main
from moeq.export.commands import check_export


def _quantize(d, out, *flags):
    assert main(["quantize", str(d), "--method", "rtn", "--nsamples", "2", "--seqlen", "32", "--skip-eval",
                 "--out", str(out), *flags]) == 0


@pytest.fixture(scope="module")
def exports(tiny_ckpt, tmp_path_factory):
    """Tiny Qwen2-MoE (hidden 64, expert intermediate 32, shared 64) exported four ways."""
    d, root = tiny_ckpt("qwen2_moe"), tmp_path_factory.mktemp("serving")
    _quantize(d, root / "w4", "--bits", "4", "--group-size", "32")
    _quantize(d, root / "w3", "--bits", "3", "--group-size", "32")
    _quantize(d, root / "asym", "--bits", "4", "--group-size", "32", "--asym")
    return root


def test_a_uniform_w4_export_passes_every_engine(exports, capsys):
    assert main(["check-serving", str(exports / "w4")]) == 0
    out = capsys.readouterr().out
    assert out.count(": OK") == 3 and "vllm" in out and "sglang" in out and "transformers" in out
    rep = json.loads((exports / "w4" / "report.json").read_text())
    assert rep["serving"] == {"vllm": [], "sglang": [], "transformers": []}  # quantize ran the same check


def test_a_w3_export_fails_naming_the_modules(exports, capsys):
    assert main(["check-serving", str(exports / "w3"), "--engine", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.experts.*.gate_proj (8 linears)" in out and "3-bit" in out and "--bits 4" in out
    assert "model.layers.0.self_attn.q_proj" in out  # dense linears too
    rep = json.loads((exports / "w3" / "report.json").read_text())
    assert any(n.startswith("vllm would not serve") for n in rep["notes"])  # quantize warned
    assert main(["check-serving", str(exports / "w3"), "--engine", "transformers"]) == 0


def test_an_asymmetric_export_fails_for_sglang_and_transformers(exports, capsys):
    assert main(["check-serving", str(exports / "asym"), "--engine", "sglang"]) == 1
    out = capsys.readouterr().out
    assert "experts.*.down_proj" in out and "zero points" in out and "--sym" in out and "WRONGLY" in out
    found = check_export(exports / "asym", ["vllm", "transformers"])
    assert not found["vllm"] and found["transformers"]  # vLLM's Marlin MoE reads int4 zero points


def test_a_group_size_that_breaks_tp2(exports, capsys):
    assert main(["check-serving", str(exports / "w4"), "--tp", "2", "--engine", "vllm,sglang"]) == 1
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.experts.*.down_proj" in out and "16 input columns" in out
    assert "shared_expert.down_proj" not in out  # 64 / 2 = 32 columns: whole groups
    assert main(["check-serving", str(exports / "w4"), "--tp", "1", "--engine", "vllm"]) == 0


def test_a_per_expert_mixed_export_fails(exports, tmp_path, capsys):
    """What an export with per-expert schemes looks like (moeq before its storage containers, other tools):
    expert 1 of layer 0 in a config group of its own."""
    import shutil

    shutil.copytree(exports / "w4", tmp_path / "mixed")
    cfg_path = tmp_path / "mixed" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    groups = cfg["quantization_config"]["config_groups"]
    one = json.loads(json.dumps(next(iter(groups.values()))))
    one["targets"], one["weights"]["num_bits"] = [r"re:model\.layers\.0\.mlp\.experts\.1\..*"], 8
    cfg["quantization_config"]["config_groups"] = {"group_x": one, **groups}
    cfg_path.write_text(json.dumps(cfg))
    for engine in ("vllm", "sglang", "transformers"):
        assert main(["check-serving", str(tmp_path / "mixed"), "--engine", engine]) == 1
        out = capsys.readouterr().out
        assert "mix w4g32, w8g32" in out and "WRONGLY" in out, out
    assert "routed experts" in out  # transformers: one scheme for every routed expert of the model


def test_bad_input_is_one_line(tmp_path, capsys, tiny_ckpt):
    assert main(["check-serving", str(tiny_ckpt("qwen2_moe"))]) == 2  # not quantized
    assert "not a compressed-tensors checkpoint" in capsys.readouterr().err
    assert main(["check-serving", str(tmp_path), "--engine", "tgi"]) == 2
    assert "unknown engine 'tgi'" in capsys.readouterr().err


def test_an_integer_w4a4_export_has_no_vllm_or_sglang_kernel(tiny_ckpt, tmp_path, capsys):
    _quantize(tiny_ckpt("qwen2_moe"), tmp_path / "a", "--bits", "4", "--group-size", "32", "--act-bits", "4",
              "--no-online-hadamard")
    assert main(["check-serving", str(tmp_path / "a"), "--engine", "vllm,sglang"]) == 1
    out = capsys.readouterr().out
    assert "no kernel for integer W4A4" in out and "--act-bits" in out
