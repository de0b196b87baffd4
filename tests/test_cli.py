"""The command line: the main job end to end on a tiny checkpoint, and clear errors for bad input."""

import json
import os
import sys

import pytest
import torch

from moeq.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_prints_fp_and_quantized_ppl_and_writes_report(tiny_ckpt, tmp_path, capsys):
    d = tiny_ckpt("qwen2_moe")
    code, out, err = run(capsys, "quantize", d, "--out", tmp_path / "o", "--method", "rtn", "--bits", "4",
                         "--group-size", "32", "--eval-seqlen", "128", "--ppl-limit", "40", "--ppl", "wikitext2,c4",
                         "--tasks", "piqa,copa", "--limit", "3", "--fidelity", "-v")
    assert code == 0, err
    assert "wikitext2" in out and "FP" in out and "rtn w4g32" in out
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    fp, q = rep["metrics"]["fp"]["wikitext2"], rep["metrics"]["quantized"]["wikitext2"]
    assert fp["ppl"] > 1 and q["ppl"] > 1 and q["bpb"] > 0 and fp["windows"] == q["windows"]
    assert rep["avg_bits"] == 4.0 and rep["seconds"]["total"] > 0 and rep["peak_memory_mb"]["cpu_rss"] > 0
    assert rep["size"]["checkpoint_bytes"] < rep["size"]["bf16_bytes"]
    for side in ("fp", "quantized"):
        assert set(rep["metrics"][side]["tasks"]) == {"piqa", "copa"}
        assert 0 <= rep["metrics"][side]["tasks"]["piqa"]["acc_norm"] <= 1
    fid = rep["metrics"]["fidelity"]
    assert 0 < fid["mean_topk_set_agreement"] <= 1 and fid["kl_fp_to_quantized"] > 0
    # the exported checkpoint evaluates to the in-memory quantized perplexity
    code, out, err = run(capsys, "eval", tmp_path / "o", "--seqlen", "128", "--ppl-limit", "40", "--tasks", "piqa",
                         "--limit", "3", "--balance", "--against", d, "--json", tmp_path / "e.json",
                         "--ppl", "wikitext2")  # with --tasks, perplexity only when asked for
    assert code == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["wikitext2"]["ppl"] == pytest.approx(q["ppl"], rel=1e-4)
    assert res["tasks"]["piqa"]["acc_norm"] == pytest.approx(rep["metrics"]["quantized"]["tasks"]["piqa"]["acc_norm"])
    assert 0 <= res["expert_balance"]["balance_std"] < 1 and set(res["expert_balance"]["layers"]) == {"0", "1"}
    assert 0 < res["fidelity"]["mean_top1_agreement"] <= 1


def test_existing_output_is_never_overwritten_without_flag(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run(capsys, "quantize", tiny_ckpt("olmoe"), "--out", out, "--method", "rtn", "--group-size", "32",
                       "--skip-eval")
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "precious"
    code, _, err = run(capsys, "quantize", tiny_ckpt("olmoe"), "--out", out, "--method", "rtn", "--group-size", "32",
                       "--skip-eval", "--overwrite")
    assert code == 2 and "not a moeq output" in err and (out / "keep.txt").read_text() == "precious"  # foreign
    (out / "keep.txt").unlink()
    code, _, err = run(capsys, "quantize", tiny_ckpt("olmoe"), "--out", out, "--method", "rtn", "--group-size", "32",
                       "--skip-eval")  # an empty folder is fine
    assert code == 0, err
    code, _, err = run(capsys, "quantize", tiny_ckpt("olmoe"), "--out", out, "--method", "rtn", "--bits", "3",
                       "--group-size", "32", "--skip-eval", "--overwrite")  # moeq's own output: replaced
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["avg_bits"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("argv, msg", [
    (["--bits", "9"], "2..8"),
    (["--bits", "1"], "2..8"),
    (["--group-size", "48"], "does not divide"),
    (["--group-size", "0"], "group size"),
    (["--nsamples", "0"], "nsamples"),
    (["--calib", "nope", "--group-size", "32"], "unknown text source"),
])
def test_bad_arguments_name_the_fix(argv, msg, tiny_ckpt, tmp_path, capsys):
    code, _, err = run(capsys, "quantize", tiny_ckpt("mixtral"), "--out", tmp_path / "o", "--skip-eval", *argv)
    assert code == 2 and msg in err
    assert not (tmp_path / "o").exists()


def test_unreadable_and_unknown_checkpoints(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "eval", empty)
    assert code == 2 and "no config.json" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    code, _, err = run(capsys, "eval", bad)
    assert code == 2 and "cannot read the config" in err
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, _, err = run(capsys, "eval", gpt2)
    assert code == 2 and "unknown architecture" in err and "qwen2_moe" in err
    code, _, err = run(capsys, "eval", tmp_path / "does" / "not" / "exist")
    assert code == 2 and "does not exist" in err


def test_seqlen_longer_than_context_is_refused(tiny_ckpt, capsys):
    code, _, err = run(capsys, "eval", tiny_ckpt("mixtral"), "--seqlen", "100000")
    assert code == 2 and "context" in err


def test_models_lists_the_bundled_models(capsys):
    code, out, _ = run(capsys, "models", "--json")
    rows = json.loads(out)
    names = {r["name"] for r in rows}
    assert {"qwen2-moe-tiny", "mixtral-tiny"} <= names
    assert sum(r["default"] for r in rows) == 1


@pytest.mark.parametrize("name", ["qwen2-moe-tiny", "mixtral-tiny"])
def test_bundled_models_load_with_plain_transformers_and_meet_the_spec(name):
    """Plain AutoModelForCausalLM loads them; <= 24 MiB; sizes multiples of 128 (g128 applies); >= 4 layers;
    the card holds measured perplexities and no expert is starved."""
    import transformers as T

    from moeq.models.bundled import bundled_path

    d = bundled_path(name)
    m = T.AutoModelForCausalLM.from_pretrained(d)
    cfg = m.config
    assert cfg.num_hidden_layers >= 4 and cfg.hidden_size % 128 == 0
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    assert inter % 128 == 0
    assert sum(f.stat().st_size for f in d.glob("*.safetensors")) <= 24 * 2**20
    with torch.no_grad():
        out = m(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert torch.isfinite(out.logits).all()
    card = (d / "MODEL_CARD.md").read_text()
    assert "| wikitext2 |" in card and "| c4 |" in card and "No expert is starved" in card


def test_calib_ebss_then_stats_measures_the_set_at_its_own_length(tiny_ckpt, tmp_path, capsys):
    d = tiny_ckpt("qwen2_moe")
    code, out, err = run(capsys, "calib", "ebss", d, "--num", "2", "--length", "12", "--width", "2",
                         "--out", tmp_path / "e.jsonl")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["input_ids"]) == 12 for r in rows)
    code, out, err = run(capsys, "calib", "stats", d, "--calib", tmp_path / "e.jsonl", "--json", tmp_path / "s.json")
    assert code == 0, err  # no --seqlen needed: the token set is measured at its own length
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["calib"]["seqlen"] == 12 and s["balance_std"] >= 0
    top_k = 2  # the tiny qwen2_moe config routes every token to top_k experts in every MoE layer
    assert all(sum(v["counts"]) == 2 * 12 * top_k for v in s["layers"].values())


def test_stale_siblings_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    """A run killed before its final rename leaves ``.OUT.tmp-PID``; the next run on OUT removes it (its
    process is gone) but never touches the sibling of a process that is still running."""
    import socket
    import subprocess

    from moeq.utils.fs import atomic_dir, write_atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that existed and is gone
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{dead.pid}"
    (stale / "sub").mkdir(parents=True)
    live = tmp_path / f".out.old-{os.getppid()}"
    live.mkdir()
    foreign = tmp_path / ".out.tmp-notapid"
    foreign.mkdir()
    rank_here = tmp_path / f".out.tmp-{socket.gethostname()}-{dead.pid}"  # a distributed rank's scratch
    rank_here.mkdir()
    rank_elsewhere = tmp_path / f".out.tmp-another-host-{dead.pid}"  # its pid means nothing on this host
    rank_elsewhere.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert not stale.exists() and live.exists() and foreign.exists() and (out / "x").read_text() == "1"
    assert not rank_here.exists() and rank_elsewhere.exists()
    f = tmp_path / "r.json"
    stale_file = tmp_path / f".r.json.tmp-{dead.pid}"
    stale_file.write_text("half")
    write_atomic(f, "{}")
    assert not stale_file.exists() and f.read_text() == "{}"


def test_eval_with_tasks_skips_perplexity_unless_asked(tiny_ckpt, tmp_path, capsys):
    d = tiny_ckpt("mixtral")
    code, out, err = run(capsys, "eval", d, "--tasks", "copa", "--limit", "2", "--json", tmp_path / "e.json")
    assert code == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert "copa" in res["tasks"] and "wikitext2" not in res
