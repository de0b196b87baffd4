"""The streaming block pipeline: checkpoints read block by block, streamed export and evaluation, memory-bounded
solves, resume after a kill, FP8 sources, and a memory bound measured on a real run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors import safe_open

from moeq.config import AWQKnobs, BitPlan, CalibSpec, QuantConfig
from moeq.evaluate.perplexity import evaluate_ppl
from moeq.evaluate.streamed import streamed_ppl
from moeq.models.fp8 import dequantize_fp8
from moeq.models.lazy import CheckpointSource, module_bytes
from moeq.models.loading import load_config, load_model
from moeq.pipeline import EvalSpec, RunOptions, quantize
from moeq.quant.primitives import QuantArgs
from moeq.solvers import registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import synthetic_ckpt  # noqa: E402  (the scale benchmark's checkpoint writer)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def cfg(method="gptq", bits=4, nsamples=4, **kw):
    return QuantConfig(method=method, plan=BitPlan(default=QuantArgs(bits, 32, True)),
                       calib=CalibSpec(kw.pop("calib", None), nsamples=nsamples, seqlen=32), **kw)


def tensors(d: Path) -> dict:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({(f.name if f.name == "transforms.safetensors" else "", k): h.get_tensor(k) for k in h.keys()})
    return out


def assert_same_tensors(a: Path, b: Path):
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("arch,method", [("qwen2_moe", "gptq"), ("deepseek_v3", "awq"), ("mixtral", "quarot-gptq")])
def test_streamed_run_writes_what_the_in_memory_run_writes(arch, method, tiny_ckpt, tmp_path):
    """--skip-eval streams the checkpoint block by block; evaluating keeps the model in memory. Same tensors."""
    d = str(tiny_ckpt(arch))
    c = cfg(method, awq=AWQKnobs(grid=4, clip_grid=5))
    streamed = quantize(d, c, tmp_path / "s", skip_eval=True)
    resident = quantize(d, c, tmp_path / "r", evals=EvalSpec(ppl_limit=2))
    assert streamed["memory"]["mode"] == "streamed" and resident["memory"]["mode"] == "resident"
    assert_same_tensors(tmp_path / "s", tmp_path / "r")
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(streamed["modules"]) == drop(resident["modules"])


def test_streamed_perplexity_equals_the_in_memory_one(tiny_ckpt, tokenizer):
    d = str(tiny_ckpt("qwen2_moe"))
    loaded = load_model(d)
    ref = evaluate_ppl(loaded.model, tokenizer, ("wikitext2",), 64, limit=6)["wikitext2"]
    src = CheckpointSource(d, load_config(d), torch.float32, torch.bfloat16)
    got = streamed_ppl(src, tokenizer, ("wikitext2",), 64, limit=6)["wikitext2"]
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-5) and got["tokens"] == ref["tokens"]
    assert all(p.is_meta for p in src.model.model.layers.parameters())  # every block was freed again


def test_streamed_evaluation_of_a_model_over_the_memory_budget(tiny_ckpt, tmp_path):
    """With --max-memory below the model size, FP and quantized perplexity are streamed, and tasks are refused
    before any work."""
    d = str(tiny_ckpt("mixtral"))
    rep = quantize(d, cfg("rtn"), tmp_path / "o", evals=EvalSpec(ppl_limit=3), options=RunOptions(max_memory=1024))
    assert rep["memory"]["mode"] == "streamed"
    w = rep["metrics"]["quantized"]["wikitext2"]
    assert w["streamed"] and rep["metrics"]["fp"]["wikitext2"]["windows"] == 3
    ref = evaluate_ppl(load_model(str(tmp_path / "o")).model, load_model(d).tokenizer, ("wikitext2",), limit=3)
    assert w["ppl"] == pytest.approx(ref["wikitext2"]["ppl"], rel=1e-5)  # the written checkpoint's perplexity
    with pytest.raises(ValueError, match="streamed block by block; downstream tasks"):
        quantize(d, cfg("rtn"), tmp_path / "t", evals=EvalSpec(tasks=("piqa",)), options=RunOptions(max_memory=1024))
    assert not (tmp_path / "t").exists() and not (tmp_path / ".t.partial").exists()


def test_chunked_solves_give_the_one_call_results(tiny_ckpt, tmp_path, monkeypatch):
    """A tiny --max-solve-memory splits every group into several statistics passes and solves one matrix per
    call; the integers are identical to one pass and one batched call per shape."""
    d = str(tiny_ckpt("qwen2_moe"))
    batches = []
    gptq = registry.SOLVERS["gptq"]
    spy = registry.Solver("gptq", lambda W, *a: batches.append(W.shape[0]) or gptq.fn(W, *a), True)
    monkeypatch.setitem(registry.SOLVERS, "gptq", spy)
    quantize(d, cfg(), tmp_path / "one", skip_eval=True)
    one = list(batches)
    batches.clear()
    quantize(d, cfg(), tmp_path / "chunk", skip_eval=True, options=RunOptions(max_solve_memory=1))
    assert max(one) > 1 and max(batches) == 1 and len(batches) == sum(one)
    assert_same_tensors(tmp_path / "one", tmp_path / "chunk")


def _cli(*args, env_extra=None):
    env = {**os.environ, "MOEQ_QUIET": "1", "PYTHONPATH": SRC, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "moeq.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, preexec_fn=_default_sigint)


def _default_sigint():
    """A child of a shell's background job inherits an ignored SIGINT (and Python then leaves it ignored): give
    the child the default, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_resume_after_a_kill_gives_identical_tensors(tiny_ckpt, tmp_path):
    d = tiny_ckpt("deepseek_v3")  # 3 blocks: dense, MoE, MoE
    base = ["quantize", d, "--method", "gptq", "--group-size", "32", "--nsamples", "4", "--seqlen", "32",
            "--skip-eval", "--max-shard-size", "100KB"]
    ref = _cli(*base, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    killed = _cli(*base, "--out", tmp_path / "o", "--kill-after-block", "1")
    assert killed.returncode == -9  # SIGKILL right after block 1 was checkpointed
    partial = tmp_path / ".o.partial"
    assert not (tmp_path / "o").exists() and json.loads((partial / "state.json").read_text())["blocks_done"] == 2
    again = _cli(*base, "--out", tmp_path / "o")
    assert again.returncode == 2 and "--resume" in again.stderr  # an interrupted run is never silently redone
    other = _cli(*base, "--out", tmp_path / "o", "--resume", "--bits", "3")
    assert other.returncode == 2 and "other settings" in other.stderr and "num_bits" in other.stderr
    fmt = _cli(*base, "--out", tmp_path / "o", "--resume", "--format", "gguf")  # blocks are stored per format
    assert fmt.returncode == 2 and "other settings" in fmt.stderr and "formats" in fmt.stderr
    done = _cli(*base, "--out", tmp_path / "o", "--resume")
    assert done.returncode == 0, done.stderr
    assert not partial.exists()
    assert_same_tensors(tmp_path / "ref", tmp_path / "o")
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    ref_rep = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert rep["memory"]["resumed_from_block"] == 2 and len(rep["modules"]) == len(ref_rep["modules"])
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded at 100KB
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "o")  # plain transformers loads the shards
    assert torch.isfinite(reloaded(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def _fp8_checkpoint(tmp_path) -> Path:
    cfg_ = synthetic_ckpt.tiny_config("deepseek_v3", hidden_size=256, intermediate_size=384, moe_intermediate_size=160,
                                      num_attention_heads=4, q_lora_rank=160, kv_lora_rank=64)
    out = tmp_path / "fp8"
    synthetic_ckpt.write_checkpoint(cfg_, out, fp8=True, std=0.05, log=lambda *a: None)
    return out


def test_fp8_source_is_dequantized_block_by_block_like_an_independent_reference(tmp_path, tokenizer):
    d = _fp8_checkpoint(tmp_path)
    raw = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            raw.update({k: h.get_tensor(k) for k in h.keys()})
    fp8 = [k for k, t in raw.items() if t.dtype == torch.float8_e4m3fn]
    assert fp8 and all(k + "_scale_inv" in raw for k in fp8)

    def reference(k):  # one 128 x 128 block at a time
        q, s = raw[k], raw[k + "_scale_inv"]
        W = torch.empty(q.shape)
        for bi in range(s.shape[0]):
            for bj in range(s.shape[1]):
                blk = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
                W[blk] = q[blk].float() * s[bi, bj]
        return W

    src = CheckpointSource(str(d), load_config(str(d)), torch.float32, torch.bfloat16)
    for i in range(src.num_blocks):
        block = src.load_block(i)
        for name, p in block.named_parameters():
            key = src.adapter.checkpoint_name(f"model.layers.{i}.{name}")
            if key in fp8:
                assert torch.equal(p.data, reference(key)), key
        src.release_block(i)
    k = fp8[0]
    assert torch.equal(dequantize_fp8(raw[k], raw[k + "_scale_inv"]), reference(k))


def test_fp8_source_quantizes_to_a_checkpoint_close_to_its_dequantized_model(tmp_path):
    d = _fp8_checkpoint(tmp_path)
    quantize(str(d), cfg("rtn", bits=8), tmp_path / "w8", skip_eval=True)
    qc = json.loads((tmp_path / "w8" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"  # the FP8 source config is replaced, not kept
    ids = torch.tensor([[5, 17, 300, 42, 7, 1000]])
    fp = CheckpointSource(str(d), load_config(str(d)), torch.float32, torch.bfloat16).load_all()
    q = T.AutoModelForCausalLM.from_pretrained(tmp_path / "w8", dtype=torch.float32)
    with torch.no_grad():
        a, b = fp(input_ids=ids).logits, q(input_ids=ids).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.999


def test_a_config_that_does_not_match_the_weights_is_refused_before_any_work(tiny_ckpt, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    src = Path(tiny_ckpt("mixtral"))
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    c = json.loads((d / "config.json").read_text())
    cases = [({"num_hidden_layers": c["num_hidden_layers"] + 2}, "missing .e.g. model.layers.2"),
             ({"num_hidden_layers": c["num_hidden_layers"] - 1}, "more layers"),
             ({"intermediate_size": c["intermediate_size"] * 2}, "other shapes")]
    for change, what in cases:
        (d / "config.json").write_text(json.dumps({**c, **change}))
        with pytest.raises(ValueError, match=what):
            quantize(str(d), cfg("rtn"), tmp_path / "o", skip_eval=True)
        assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()
    (d / "config.json").write_text(json.dumps(c))
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])  # a truncated download
    with pytest.raises(ValueError, match="fetch the checkpoint again"):
        quantize(str(d), cfg("rtn"), tmp_path / "o", skip_eval=True)


PROBE = r"""
import sys, torch
import moeq.cli, moeq.pipeline  # the libraries a run imports (transformers, compressed-tensors, tokenizers)
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from moeq.models.lazy import CheckpointSource
from moeq.models.loading import load_config, load_tokenizer
from moeq.utils.device import peak_rss_bytes
tok = load_tokenizer(sys.argv[1])
src = CheckpointSource(sys.argv[1], load_config(sys.argv[1]), torch.float32, torch.bfloat16)
src.load_embeddings(); src.release_embeddings()
src.load_block(1)
print(peak_rss_bytes())
"""


def _streamed_peak(d: Path, out: Path, env: dict) -> int:
    run = subprocess.run([sys.executable, "-m", "moeq.cli", "quantize", str(d), "--method", "rtn", "--skip-eval",
                          "--out", str(out)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["memory"]["mode"] == "streamed"
    return int(rep["peak_memory_mb"]["cpu_rss"] * (1 << 20))


def test_peak_memory_of_a_streamed_run_is_bounded_by_the_block_not_the_model(tmp_path):
    """Peak RSS of a streamed RTN run minus that of a process that only imports the same libraries and loads
    one block stays under a few blocks, on a model several times bigger than that bound, and a model four
    times deeper peaks at the same memory. (Peaks are each program's own VmHWM, which, unlike ru_maxrss, does
    not include the memory of the pytest process they were forked from.)"""
    widths = dict(hidden_size=256, moe_intermediate_size=256, num_experts=32, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=512)
    for layers in (6, 24):
        c = synthetic_ckpt.qwen3_moe_config(0, num_layers=layers, **widths)
        synthetic_ckpt.write_checkpoint(c, tmp_path / f"m{layers}", shard_size="64MB", log=lambda *a: None)
    d = tmp_path / "m24"
    src = CheckpointSource(str(d), load_config(str(d)), torch.float32, torch.bfloat16)
    block = module_bytes(src.adapter.blocks[1], torch.float32)
    model = module_bytes(src.model, torch.float32)
    bound = 4 * block + (64 << 20)  # the block, a solve's copies of one group, its packed tensors; slack
    assert model > 3.5 * bound  # loading the whole model would break the bound several times over
    env = {**os.environ, "PYTHONPATH": SRC, "MOEQ_QUIET": "1"}
    base = int(subprocess.run([sys.executable, "-c", PROBE, str(d)], capture_output=True, text=True, env=env,
                              check=True).stdout)
    deep, shallow = _streamed_peak(d, tmp_path / "o24", env), _streamed_peak(tmp_path / "m6", tmp_path / "o6", env)
    assert base < deep and deep - base < bound, (deep - base, bound, block)
    # flat in depth: 18 more blocks add a fifth of their size at most (a run that kept them, or leaked 5 MB
    # per block, would not pass; the peak of either run moves by some tens of MB from run to run)
    assert deep - shallow < 0.2 * 18 * block, (deep - shallow, block)


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_ctrl_c_or_sigterm_keeps_the_partial_run_and_resume_with_disk_activations_finishes_it(sig, tiny_ckpt,
                                                                                              tmp_path):
    d = tiny_ckpt("deepseek_v3")
    quantize(str(d), cfg(), tmp_path / "ref", skip_eval=True)
    base = ["quantize", d, "--method", "gptq", "--group-size", "32", "--nsamples", "4", "--seqlen", "32",
            "--skip-eval", "--out", tmp_path / "o"]
    stopped = _cli(*base, "--kill-after-block", f"0:{sig}")  # the signal arrives once block 0 is checkpointed
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
    assert "--resume" in stopped.stderr and ".o.partial" in stopped.stderr and "1 of 3 blocks" in stopped.stderr
    done = _cli(*base, "--resume", "--offload-activations", "disk")
    assert done.returncode == 0, done.stderr
    assert_same_tensors(tmp_path / "ref", tmp_path / "o")
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["memory"]["activations"] == "disk" and rep["memory"]["resumed_from_block"] == 1


def test_a_second_run_reuses_the_fp_figures(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEQ_CACHE", str(tmp_path / "cache"))
    d = str(tiny_ckpt("olmoe"))
    ev = EvalSpec(ppl_limit=2)
    first = quantize(d, cfg("rtn"), tmp_path / "a", evals=ev)
    calls = []
    import moeq.pipeline as P

    real = P.evaluate
    monkeypatch.setattr(P, "evaluate", lambda *a, **k: calls.append(k.get("label") or a[-1]) or real(*a, **k))
    second = quantize(d, cfg("rtn", bits=3), tmp_path / "b", evals=ev)
    assert second["metrics"]["fp"] == first["metrics"]["fp"] and any("reused" in n for n in second["notes"])
    assert len(calls) == 1  # only the quantized model was evaluated
    third = quantize(d, cfg("rtn"), tmp_path / "c", evals=EvalSpec(ppl_limit=3))  # other settings: computed
    assert third["metrics"]["fp"]["wikitext2"]["windows"] == 3
