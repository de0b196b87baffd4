"""GGUF export: the file holds moeq's own integers (checked with gguf-py's dequantizer, independently of
moeq) and llama.cpp itself (llama-cpp-python) loads it and computes moeq's in-memory quantized model.

llama.cpp quantizes activations to 8 bits inside its quantized matmuls (CPU), so its logits differ from
moeq's fp32 computation by a little: on these models the median over positions of the largest logit
difference is 0.03-0.07 (logits' std about 2.3 for the bundled models), single positions up to about 2.5
where two experts are nearly tied; perplexity agrees within 1%."""

import math

import numpy as np
import pytest
import torch

from moeq.cli import main
from moeq.config import BitPlan, CalibSpec, QuantConfig
from moeq.evaluate.perplexity import wikitext2_windows
from moeq.export.gguf_arch import rope_permute
from moeq.pipeline import quantize
from moeq.quant.primitives import QuantArgs

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the dev extra: pip install -e '.[dev]'")
gguf = pytest.importorskip("gguf")

W4 = QuantArgs(4, 32, True)
MIXED = BitPlan(default=QuantArgs(3, 32, True), rules=[(r".*self_attn\..*", QuantArgs(8, 32, True)),
                                                      (r".*shared_expert\..*", QuantArgs(4, 64, False))])


def _export(model, out, plan=BitPlan(default=W4), method="rtn", nsamples=2, formats=("compressed-tensors", "gguf")):
    from moeq.pipeline import RunOptions

    c = QuantConfig(method=method, plan=plan, calib=CalibSpec("wikitext2", nsamples=nsamples, seqlen=128))
    return quantize(str(model), c, out, skip_eval=True, return_model=True, options=RunOptions(formats=formats))


def _llama(path):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2,
                           type_k=0, type_v=0, verbose=False)  # fp32 KV cache: only the matmuls quantize


def _logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    lp = torch.log_softmax(torch.from_numpy(logits[:-1]).double(), -1)  # (T-1, V)
    return float(-lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())


def _compare(model, out, m, windows: list[list[int]]) -> tuple[float, float, float]:
    """(median over positions of the max |logit diff|, ppl llama.cpp, ppl moeq) over ``windows``."""
    llm = _llama(out / "model.gguf")
    try:
        rowmax, nll_l, nll_m, n = [], 0.0, 0.0, 0
        for ids in windows:
            theirs = _logits(llm, ids)
            with torch.no_grad():
                ours = m(input_ids=torch.tensor([ids])).logits[0].float().numpy()
            rowmax += list(np.abs(theirs - ours).max(1))
            nll_l, nll_m, n = nll_l + _nll(theirs, ids), nll_m + _nll(ours, ids), n + len(ids) - 1
        return float(np.median(rowmax)), math.exp(nll_l / n), math.exp(nll_m / n)
    finally:
        llm.close()


@pytest.mark.parametrize("model", ["qwen2-moe-tiny", "mixtral-tiny"])
def test_bundled_w4_gptq_gguf_runs_in_llama_cpp_like_moeq(model, tmp_path, tokenizer):
    rep, m = _export(model, tmp_path / "o", method="gptq", nsamples=8)
    assert rep["gguf"]["types"].get("Q4_0") and not rep["gguf"]["f32_linears"]
    windows = [w.tolist() for w in wikitext2_windows(tokenizer, 256, None).ids[:3]]
    med, ppl_llama, ppl_moeq = _compare(model, tmp_path / "o", m, windows)
    assert med < 0.1, med
    assert abs(ppl_llama / ppl_moeq - 1) < 0.01, (ppl_llama, ppl_moeq)


def test_a_mixed_plan_maps_to_per_tensor_types_and_runs(tmp_path, tokenizer):
    rep, m = _export("qwen2-moe-tiny", tmp_path / "o", plan=MIXED, method="gptq", nsamples=4, formats=("gguf",))
    types = rep["gguf"]["types"]
    # experts W3 in Q4_0 blocks, the asymmetric W4 shared expert in Q4_1, attention W8 in Q8_0: a run writing
    # GGUF quantizes 8-bit grids on [-127, 127] and keeps 7-bit asymmetric scales (ggml grids)
    assert types.get("Q4_0") and types.get("Q4_1") and types.get("Q8_0") and not rep["gguf"]["f32_linears"]
    assert {r["bits"] for r in rep["modules"] if ".self_attn." in r["name"]} == {8}
    assert not list((tmp_path / "o").glob("*.safetensors"))  # --format gguf alone: no compressed-tensors shards
    windows = [w.tolist() for w in wikitext2_windows(tokenizer, 256, None).ids[:2]]
    med, ppl_llama, ppl_moeq = _compare("qwen2-moe-tiny", tmp_path / "o", m, windows)
    assert med < 0.1 and abs(ppl_llama / ppl_moeq - 1) < 0.01, (med, ppl_llama, ppl_moeq)


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe", "deepseek_v3", "mixtral"])
def test_every_llama_cpp_architecture_loads_and_matches(arch, tiny_ckpt, tmp_path):
    rep, m = _export(tiny_ckpt(arch), tmp_path / "o", formats=("gguf",))
    ids = torch.randint(1, 8000, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    med, ppl_llama, ppl_moeq = _compare(arch, tmp_path / "o", m, [ids])
    assert med < 0.1 and abs(ppl_llama / ppl_moeq - 1) < 0.01, (med, ppl_llama, ppl_moeq)


def test_full_range_w4_g32_is_llama_cpps_own_q4_0(tiny_ckpt, tmp_path):
    """--full-range at W4 g32 is llama.cpp's Q4_0 rule (d = the block's extreme / -8): RTN's integers are
    gguf-py's reference Q4_0 quantization of the bf16 weights (the rare difference: moeq rounds the scale to
    bf16 before choosing integers), the file holds them as Q4_0 and llama.cpp computes moeq's model."""
    from safetensors.torch import load_file

    ckpt = tiny_ckpt("qwen2_moe")
    rep, m = _export(ckpt, tmp_path / "o", plan=BitPlan(default=QuantArgs(4, 32, True, full_range=True)))
    assert rep["gguf"]["types"].get("Q4_0") and not rep["gguf"]["f32_linears"]
    fp = load_file(str(ckpt / "model.safetensors"))
    name = "model.layers.0.self_attn.o_proj"
    w = fp[name + ".weight"].float().numpy()  # (out, in)
    ref = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0),
                                 gguf.GGMLQuantizationType.Q4_0).reshape(w.shape)
    ours = _ct_values(tmp_path / "o", name)
    assert np.mean(np.isclose(ours, ref, rtol=2 ** -7, atol=0)) > 0.99
    ids = torch.randint(1, 8000, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    med, ppl_llama, ppl_moeq = _compare("qwen2_moe", tmp_path / "o", m, [ids])
    assert med < 0.1 and abs(ppl_llama / ppl_moeq - 1) < 0.01, (med, ppl_llama, ppl_moeq)


def _ct_values(folder, module: str) -> np.ndarray:
    """(q - zero) * scale of one linear, unpacked from the compressed-tensors checkpoint with compressed-tensors'
    own unpacker (fp32: what the integers mean, before any rounding to the model dtype)."""
    import json

    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    with safe_open(str(folder / "model.safetensors"), "pt") as h:
        t = {k.rpartition(".")[2]: h.get_tensor(k) for k in h.keys() if k.startswith(module + ".weight")}
    group = next(g for g in qc["config_groups"].values()
                 if any(__import__("re").match(x[3:], module) for x in g["targets"]))
    bits, scale = group["weights"]["num_bits"], t["weight_scale"].float()  # (out, G)
    q = unpack_from_int32(t["weight_packed"], bits, torch.Size(t["weight_shape"].tolist())).float()  # (out, in)
    z = unpack_from_int32(t["weight_zero_point"], bits, scale.shape, packed_dim=0).float() \
        if "weight_zero_point" in t else torch.zeros_like(scale)
    k = q.shape[1] // scale.shape[1]
    return ((q - z.repeat_interleave(k, 1)) * scale.repeat_interleave(k, 1)).numpy()


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_gguf_blocks_hold_moeqs_integers_exactly(arch, tiny_ckpt, tmp_path):
    """gguf-py's own dequantizer on every quantized GGUF tensor gives exactly the values of the integers in the
    compressed-tensors checkpoint (unpacked by compressed-tensors), and moeq's in-memory weights up to their
    rounding to bf16 (moeq, like transformers, holds the dequantized weights in the checkpoint dtype)."""
    plan = BitPlan(default=QuantArgs(3, 32, True), rules=[(r".*self_attn\.[qkv]_proj", QuantArgs(8, 32, True)),
                                                         (r".*\.o_proj", QuantArgs(4, 32, False))])
    _, m = _export(tiny_ckpt(arch), tmp_path / "o", plan=plan)
    sd = {k: v.float() for k, v in m.state_dict().items()}
    reader = gguf.GGUFReader(str(tmp_path / "o" / "model.gguf"))
    heads = {"attn_q": m.config.num_attention_heads, "attn_k": m.config.num_key_value_heads}
    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    proj = {"gate": "w1", "up": "w3", "down": "w2"} if arch == "mixtral" else \
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    checked = set()
    for t in reader.tensors:
        if t.tensor_type.name not in ("Q4_0", "Q4_1", "Q8_0"):
            continue
        got = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy, GGUF's (..., rows, cols) order
        blk, kind = int(t.name.split(".")[1]), t.name.split(".")[2]
        base = f"model.layers.{blk}"
        if kind.endswith("_exps"):
            p = proj[kind.split("_")[1]]
            want = np.stack([_ct_values(tmp_path / "o", f"{base}.{moe}.experts.{e}.{p}") for e in range(got.shape[0])])
            mem = sd[f"{base}.mlp.experts.down_proj"] if p in ("w2", "down_proj") else \
                sd[f"{base}.mlp.experts.gate_up_proj"].split(got.shape[1], 1)[0 if p in ("w1", "gate_proj") else 1]
        else:
            name = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
                    "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj"}[kind]
            want, mem = _ct_values(tmp_path / "o", f"{base}.{name}"), sd[f"{base}.{name}.weight"]
            if arch == "mixtral" and kind in heads:  # llama.cpp's interleaved-pair RoPE rows
                want, mem = rope_permute(heads[kind])(want), torch.from_numpy(rope_permute(heads[kind])(mem.numpy()))
        got = got.reshape(want.shape)
        assert np.array_equal(got, want), t.name
        assert np.allclose(got, mem.numpy(), rtol=2 ** -8, atol=0), t.name  # bf16 rounding only
        checked.add(t.tensor_type.name)
    assert checked == {"Q4_0", "Q4_1", "Q8_0"}
    assert not [t.name for t in reader.tensors if t.tensor_type.name == "F32" and t.name.endswith("attn_q.weight")]


def test_unsupported_models_are_refused_before_any_work(tiny_ckpt, tmp_path, capsys):
    code = main(["quantize", str(tiny_ckpt("llama")), "--format", "gguf", "--skip-eval", "--group-size", "32",
                 "--seqlen", "32", "--out", str(tmp_path / "o")])
    assert code == 2 and "GGUF export supports" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing left behind
    assert main(["quantize", "--format", "safetensors", "--out", str(tmp_path / "o")]) == 2
    assert "unknown format 'safetensors'" in capsys.readouterr().err


def test_moeq_export_converts_an_existing_output(tiny_ckpt, tmp_path, capsys):
    assert main(["quantize", str(tiny_ckpt("olmoe")), "--method", "rtn", "--group-size", "32", "--skip-eval",
                 "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "o")]) == 0
    assert main(["export", str(tmp_path / "o"), "--format", "gguf"]) == 0
    assert "Q4_0" in capsys.readouterr().out and (tmp_path / "o" / "model.gguf").is_file()
    assert main(["export", str(tmp_path / "o"), "--format", "gguf"]) == 2  # exists: --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "o"), "--format", "gguf", "--overwrite"]) == 0
    assert not list(tmp_path.glob("o/.*.tmp"))


@pytest.mark.parametrize("bits, qtype", [(2, "Q3_K"), (3, "Q3_K"), (4, "Q6_K"), (6, "Q6_K")])
def test_kquant_grids_pack_exactly(bits, qtype):
    """--kquant-scales grids are K-quant blocks bit for bit (gguf-py's dequantizer as the reference)."""
    from moeq.export.gguf_quant import KGrid, fits_k, pack_k
    from moeq.quant.primitives import compute_qparams, quantize as grid_quantize

    args = QuantArgs(bits, 16, True, superblock=True)
    W = torch.randn(8, 512, generator=torch.Generator().manual_seed(bits)) ** 3  # heavy-tailed rows
    s, z = compute_qparams(W, args, torch.bfloat16)  # (8, 32): snapped per 256 columns
    assert torch.equal(s.to(torch.bfloat16).float(), s) and torch.equal(s.half().float(), s)  # exact in both
    g = KGrid(grid_quantize(W, s, z, args).numpy().astype(np.int16), s.numpy())
    assert fits_k(g, qtype) and (qtype == "Q6_K" or not fits_k(KGrid(g.q * 8, g.s), qtype))
    raw, t = pack_k(g, qtype)
    assert t.name == qtype and raw.shape == (8, 2 * {"Q3_K": 110, "Q6_K": 210}[qtype])
    assert np.array_equal(gguf.quants.dequantize(raw, t).reshape(8, 512), g.values())


def test_q6k_attention_q3k_experts_run_in_llama_cpp(tmp_path, tokenizer):
    plan = BitPlan(default=QuantArgs(3, 16, True, True), rules=[(r".*self_attn\..*", QuantArgs(6, 16, True, True))])
    rep, m = _export("mixtral-tiny", tmp_path / "o", plan=plan, formats=("gguf",))
    assert rep["gguf"]["types"]["Q3_K"] == 4 * 3 and rep["gguf"]["types"]["Q6_K"] == 4 * 4
    windows = [w.tolist() for w in wikitext2_windows(tokenizer, 256, None).ids[:2]]
    med, ppl_llama, ppl_moeq = _compare("mixtral-tiny", tmp_path / "o", m, windows)
    assert med < 0.15 and abs(ppl_llama / ppl_moeq - 1) < 0.01, (med, ppl_llama, ppl_moeq)


KMIN = {"Q2_K": QuantArgs(2, 16, False, True), "Q4_K": QuantArgs(4, 32, False, True),
        "Q5_K": QuantArgs(5, 32, False, True)}


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K", "Q5_K"])
def test_kquant_float_minimum_grids_pack_exactly(qtype):
    """--kquant-scales --asym grids are llama.cpp's Q2_K / Q4_K / Q5_K blocks: per super-block, scales d k and
    minima dmin n with fp16 d, dmin and small integers k, n; gguf-py's dequantizer gives moeq's values."""
    from moeq.export.gguf_quant import KMIN_BYTES, fits_km, kmgrid_from, pack_km
    from moeq.quant.primitives import compute_qparams, quantize as grid_quantize

    args = KMIN[qtype]
    kmax, per = args.kmax, 256 // args.group_size
    W = torch.randn(8, 512, generator=torch.Generator().manual_seed(args.num_bits)) ** 3 - 0.3  # skewed rows
    s, z = compute_qparams(W, args, torch.bfloat16)  # (8, G)
    m = (z - args.qmin) * s  # (8, G) the float minima
    assert not torch.equal(z, z.round()) and (m >= -1e-6).all()
    for x, lo in ((s, 1), (m, 0)):  # both on their super-block's fp16 factor times an integer in [lo, kmax]
        x = x.view(8, -1, per).double()
        d = (x.amax(-1, keepdim=True) / kmax).half().double()
        k = x / d
        assert ((k - k.round()).abs() < 1e-4).all() and k.round().min() >= lo and k.round().max() <= kmax
    q = grid_quantize(W, s, z, args)
    Wq = (q - z.repeat_interleave(args.group_size, 1)) * s.repeat_interleave(args.group_size, 1)
    assert (Wq - W).abs().max() < s.max()  # a grid step at most (clipped ends included)
    g = kmgrid_from(q.numpy(), s.numpy(), z.numpy(), args)
    assert g.qtype == qtype and fits_km(g, qtype) and not fits_km(g, "Q4_K" if qtype != "Q4_K" else "Q5_K")
    raw, t = pack_km(g, qtype)
    assert t.name == qtype and raw.shape == (8, 2 * KMIN_BYTES[qtype])
    got = gguf.quants.dequantize(raw, t).reshape(8, 512)
    assert np.allclose(got, Wq.numpy(), rtol=0, atol=1e-6 * float(W.abs().max()))  # fp32 rounding of z only


Q6K = QuantArgs(6, 16, True, True)
Q4KM = BitPlan(default=KMIN["Q4_K"], rules=[(r".*self_attn\.v_proj", Q6K), (r".*experts\.\d+\.down_proj", Q6K)])


@pytest.mark.parametrize("plan, method, types", [
    (BitPlan(default=KMIN["Q4_K"], rules=[(r".*self_attn\..*", KMIN["Q5_K"])]), "gptq", {"Q4_K": 12, "Q5_K": 16}),
    (BitPlan(default=KMIN["Q2_K"], rules=[(r".*self_attn\..*", KMIN["Q4_K"])]), "blocktune", {"Q2_K": 12, "Q4_K": 16}),
    (Q4KM, "gptq", {"Q4_K": 20, "Q6_K": 8}),  # llama.cpp's Q4_K_M idea: v and the experts' down in Q6_K
])
def test_float_minimum_kquants_run_in_llama_cpp(tmp_path, tokenizer, plan, method, types, capsys):
    """GGUF-only: every llama.cpp tensor takes its own type (q/k/v or an expert's gate/up/down may differ)."""
    rep, m = _export("mixtral-tiny", tmp_path / "o", plan=plan, method=method, formats=("gguf",))
    assert main(["eval", str(tmp_path / "o")]) == 2 and "is a GGUF-only output" in capsys.readouterr().err
    assert {t: n for t, n in rep["gguf"]["types"].items() if t.endswith("_K")} == types
    assert not rep["gguf"]["f32_linears"] and not list((tmp_path / "o").glob("*.safetensors"))
    bpw = {"Q2_K": 2.625, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}
    lo, hi = sorted(bpw[t] for t in types)
    assert lo < rep["avg_bits_with_overhead"] < hi  # stored bits per weight, as ggml stores them
    reader = gguf.GGUFReader(str(tmp_path / "o" / "model.gguf"))  # the in-memory weights are llama.cpp's values
    t = {t.name: t for t in reader.tensors}["blk.0.ffn_gate_exps.weight"]  # a float-minimum type in every plan
    assert t.tensor_type.name in KMIN
    got = gguf.quants.dequantize(t.data, t.tensor_type)  # (E, inter, hidden)
    mem = m.state_dict()["model.layers.0.mlp.experts.gate_up_proj"].float().numpy()[:, : got.shape[1]]  # gate half
    assert np.allclose(got, mem, rtol=0, atol=1e-6 * np.abs(mem).max())  # fp32 values, not rounded to bf16
    windows = [w.tolist() for w in wikitext2_windows(tokenizer, 256, None).ids[:2]]
    med, ppl_llama, ppl_moeq = _compare("mixtral-tiny", tmp_path / "o", m, windows)
    assert med < 0.15 and abs(ppl_llama / ppl_moeq - 1) < 0.01, (med, ppl_llama, ppl_moeq)


def test_float_minimum_kquants_are_gguf_only(tmp_path, capsys):
    with pytest.raises(ValueError, match="--bits 4/5 --group-size 32"):
        QuantArgs(4, 16, False, superblock=True)
    code = main(["quantize", "mixtral-tiny", "--bits", "4", "--group-size", "32", "--asym", "--kquant-scales",
                 "--skip-eval", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "compressed-tensors cannot store" in err and "--format gguf" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert main(["plan", "mixtral-tiny", "--avg-bits", "3", "--kquant-scales", "--out", str(tmp_path / "p.yaml")]) == 2
    assert "--kquant-scales belongs to `moeq quantize`" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_kquant_scales_need_their_layout(tmp_path, capsys):
    with pytest.raises(ValueError, match="--group-size 16"):
        QuantArgs(3, 32, True, superblock=True)
    code = main(["quantize", "qwen2-moe-tiny", "--bits", "3", "--group-size", "16", "--kquant-scales",
                 "--skip-eval", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "multiples of 256" in err and "down_proj has 128" in err  # the experts' width


def test_a_failed_export_leaves_nothing(tiny_ckpt, tmp_path, capsys, monkeypatch):
    assert main(["quantize", str(tiny_ckpt("olmoe")), "--method", "rtn", "--group-size", "32", "--skip-eval",
                 "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "o")]) == 0
    def boom(self, *a, **k):  # interrupted once the tensors are in the temporary file
        raise KeyboardInterrupt
    monkeypatch.setattr(gguf.GGUFWriter, "close", boom)
    assert main(["export", str(tmp_path / "o"), "--format", "gguf"]) == 130
    assert not list((tmp_path / "o").glob("*.gguf*")) and not list((tmp_path / "o").glob(".*.tmp"))
    (tmp_path / "o" / "tokenizer.json").unlink()
    monkeypatch.undo()
    assert main(["export", str(tmp_path / "o"), "--format", "gguf"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err and not list((tmp_path / "o").glob("*.gguf*"))
