"""Several ranks on torch.distributed (gloo, CPU): ``torchrun --nproc-per-node 2 -m moeq ...`` runs the same code
that runs with nccl on GPUs. Every run here is the real CLI in subprocesses, one thread per process (the
single-process reference too: thread count changes float results), and the 2-rank result is compared with
the 1-process result computed independently: identical integers, scales and perplexity (the Hessians are
summed in fp64, so the split of the calibration batches over the ranks does not change them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeq.methods import METHODS, single_process_reason

SRC = str(Path(__file__).resolve().parents[1] / "src")
SMALL = ("--bits", "4", "--group-size", "32", "--nsamples", "8", "--seqlen", "32", "--batch-size", "2")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=SRC, MOEQ_QUIET="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def one(*argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeq", *map(str, argv)], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def two(*argv, timeout=300) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m moeq ARGV`` (--standalone: a free port of its own)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "moeq", *map(str, argv)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _moeq_traceback(err: str) -> bool:
    return any('File "' in ln and f"{os.sep}moeq{os.sep}" in ln for ln in err.splitlines())


DISTRIBUTED = [m for m in METHODS if single_process_reason(m) is None]
SINGLE = [m for m in METHODS if single_process_reason(m) is not None]


@pytest.mark.parametrize("method", DISTRIBUTED)
def test_two_ranks_write_the_single_process_checkpoint(method, tmp_path):
    ckpt = "mixtral-tiny"  # the bundled model
    calib = ("--calib", "wikitext2") if METHODS[method].calib == "ebss" else ()  # EBSS splitting: its own test
    r1 = one("quantize", ckpt, "--method", method, *SMALL, *calib, "--skip-eval", "--out", tmp_path / "one")
    assert r1.returncode == 0, r1.stderr
    r2 = two("quantize", ckpt, "--method", method, *SMALL, *calib, "--skip-eval", "--device", "cpu",
             "--out", tmp_path / "two")
    assert r2.returncode == 0, r2.stderr
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
    rep = json.loads((tmp_path / "two" / "report.json").read_text())
    d = rep["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and [r["rank"] for r in d["ranks"]] == [0, 1]
    assert sum(r["linears_solved"] for r in d["ranks"]) == len(rep["modules"])  # every linear solved once
    assert all(r["linears_solved"] > 0 for r in d["ranks"])  # and both ranks solved some
    one_rep = json.loads((tmp_path / "one" / "report.json").read_text())
    assert rep["expert_tokens"] == one_rep["expert_tokens"]  # routed-token counts summed over the ranks
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch or partial left


def test_two_ranks_streamed_gptq_evaluates_like_one_process_and_reloads(tiny_ckpt, tmp_path):
    """Model streamed block by block (over --max-memory), activations on disk, perplexity split over the ranks;
    the checkpoint loads in plain transformers."""
    from transformers import AutoModelForCausalLM

    ckpt = tiny_ckpt("qwen2_moe")
    run = ("quantize", ckpt, "--method", "gptq", *SMALL, "--max-memory", "1MB", "--offload-activations", "disk",
           "--ppl-limit", "6", "--eval-seqlen", "32", "--no-fp-cache")
    r1 = one(*run, "--out", tmp_path / "one")
    assert r1.returncode == 0, r1.stderr
    r2 = two(*run, "--device", "cpu", "--out", tmp_path / "two")
    assert r2.returncode == 0, r2.stderr
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
    m1, m2 = (json.loads((tmp_path / d / "report.json").read_text())["metrics"] for d in ("one", "two"))
    assert m1 == m2  # FP and quantized perplexity, bit for bit
    assert "wikitext2" in r2.stdout and r2.stdout.count("wikitext2  ppl") == 1  # rank 0 prints, once
    ids = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "one").eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "two").eval()(ids).logits
    assert torch.equal(a, b)


def test_eval_perplexity_split_over_ranks_is_the_single_process_figure(tmp_path):
    args = ("eval", "qwen2-moe-tiny", "--ppl", "wikitext2,c4", "--ppl-limit", "5", "--eval-seqlen", "64")
    r1 = one(*args, "--json", tmp_path / "one.json")
    assert r1.returncode == 0, r1.stderr
    r2 = two(*args, "--device", "cpu", "--json", tmp_path / "two.json")
    assert r2.returncode == 0, r2.stderr
    assert json.loads((tmp_path / "one.json").read_text()) == json.loads((tmp_path / "two.json").read_text())


def test_ebss_generation_is_split_over_ranks_and_identical(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("mixtral")
    args = ("calib", "ebss", ckpt, "--nsamples", "6", "--length", "12", "--batch", "2", "--width", "2")
    r1 = one(*args, "--out", tmp_path / "one.jsonl")
    assert r1.returncode == 0, r1.stderr
    r2 = two(*args, "--device", "cpu", "--out", tmp_path / "two.jsonl")
    assert r2.returncode == 0, r2.stderr
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()


@pytest.mark.parametrize("method", SINGLE)
def test_methods_that_cannot_split_are_refused_with_the_reason(method, tiny_ckpt, tmp_path):
    r = two("quantize", tiny_ckpt("mixtral"), "--method", method, *SMALL, "--skip-eval", "--device", "cpu",
            "--out", tmp_path / "o")
    assert r.returncode != 0
    assert not _moeq_traceback(r.stderr), r.stderr  # torchrun's own summary of the failed ranks is not ours
    assert f"moeq quantize: error: {single_process_reason(method)}" in r.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


def test_a_rank_that_dies_ends_the_run_and_resume_gives_the_single_process_result(tiny_ckpt, tmp_path):
    """Rank 1 is SIGKILLed once block 0 is checkpointed; rank 0, waiting in a collective, is stopped too (no
    hang), no output appears, the partial run holds both ranks' state; resuming it with the same number of
    ranks writes the single-process checkpoint, with another number it is refused."""
    ckpt = tiny_ckpt("deepseek_v3")  # 3 blocks: dense, MoE, MoE
    base = ("quantize", ckpt, "--method", "gptq", *SMALL, "--skip-eval")
    r1 = one(*base, "--out", tmp_path / "one")
    assert r1.returncode == 0, r1.stderr
    t = time.perf_counter()
    killed = two(*base, "--device", "cpu", "--dist-timeout", "60", "--kill-after-block", "0@1",
                 "--out", tmp_path / "two", timeout=240)
    assert killed.returncode != 0 and time.perf_counter() - t < 120
    partial = tmp_path / ".two.partial"
    assert not (tmp_path / "two").exists() and (partial / "state.json").is_file()
    assert json.loads((partial / "state.json").read_text())["blocks_done"] >= 1 and (partial / "acts-rank1").is_dir()
    other = one(*base, "--resume", "--out", tmp_path / "two")
    assert other.returncode == 2 and "ranks" in other.stderr  # another world size would split the batches otherwise
    resumed = two(*base, "--device", "cpu", "--resume", "--out", tmp_path / "two")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not list((tmp_path / "two").glob("acts*"))
