"""Bad input, table-driven: every row runs the real ``moeq`` command in a subprocess and checks that it fails
the way a user can act on: the expected exit status, one error line ``moeq CMD: error: ...`` naming the
culprit (argparse's usage + error line for flags refused at parse time), no traceback, and nothing written:
no output, no hidden ``.NAME.partial``/temporary sibling, no stray file in the case's folder, fixtures
untouched. The rows run two at a time (each subprocess mostly waits on imports); all of them fail before
any weight is read except the calibration-file rows of ``quantize`` (read after the tiny model is opened).
One row must succeed: ``--calib`` naming WikiText-2's raw validation file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SRC = str(Path(__file__).resolve().parents[1] / "src")
Q = ("--skip-eval", "--method", "rtn", "--group-size", "32")  # the cheapest quantize run
TIMEOUT = 120  # seconds per row; every row takes a few


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # "{m}": the tiny model, "{fx}": the fixtures folder, "{out}": this case's output path
    culprit: str  # what the error must name (a flag, a file, a value)
    parse_error: bool = False  # refused by argparse: its usage, then the error line
    code: int = 2


def case(name, *argv, culprit, parse=False, code=2) -> Case:
    return Case(name, tuple(argv), culprit, parse, code)


CASES = [
    # ------------------------------------------------------------------ quantize
    case("q-bits-9", "quantize", "{m}", "--out", "{out}", *Q, "--bits", "9", culprit="--bits", parse=True),
    case("q-bits-1", "quantize", "{m}", "--out", "{out}", *Q, "--bits", "1", culprit="--bits", parse=True),
    case("q-group-size-0", "quantize", "{m}", "--out", "{out}", "--group-size", "0", culprit="--group-size",
         parse=True),
    case("q-group-size-48", "quantize", "{m}", "--out", "{out}", "--skip-eval", "--method", "rtn", "--group-size",
         "48", culprit="group size 48"),
    case("q-full-range-asym", "quantize", "{m}", "--out", "{out}", *Q, "--asym", "--full-range", culprit="--full-range"),
    case("q-method", "quantize", "{m}", "--out", "{out}", "--method", "nope", culprit="--method", parse=True),
    case("q-missing-model", "quantize", "{fx}/no-such-model", "--out", "{out}", *Q, culprit="no-such-model"),
    case("q-hub-offline", "quantize", "someorg/somemodel", "--out", "{out}", *Q, culprit="someorg/somemodel"),
    case("q-existing-out", "quantize", "{m}", "--out", "{fx}/existing", *Q, culprit="--overwrite"),
    case("q-out-is-model", "quantize", "{fx}/victim", "--out", "{fx}/victim", "--overwrite", *Q, culprit="victim"),
    case("q-out-inside-model", "quantize", "{fx}/victim", "--out", "{fx}/victim/q", *Q, culprit="is inside"),
    case("q-out-around-model", "quantize", "{fx}/victim", "--out", "{fx}", "--overwrite", *Q, culprit="fixtures"),
    case("q-out-is-calib", "quantize", "{m}", "--out", "{fx}/notext.jsonl", "--overwrite", "--calib",
         "{fx}/notext.jsonl", *Q, culprit="notext.jsonl"),
    case("q-out-empty", "quantize", "{m}", "--out", "", *Q, culprit="--out"),
    case("q-out-file", "quantize", "{m}", "--out", "{fx}/afile.txt", "--overwrite", *Q, culprit="afile.txt"),
    case("q-out-proc", "quantize", "{m}", "--out", "/proc/x", *Q, culprit="/proc"),
    case("q-more-layers", "quantize", "{fx}/more", "--out", "{out}", *Q, culprit="missing"),
    case("q-fewer-layers", "quantize", "{fx}/fewer", "--out", "{out}", *Q, culprit="more layers"),
    case("q-truncated", "quantize", "{fx}/trunc", "--out", "{out}", *Q, culprit="model.safetensors"),
    case("q-unknown-type", "quantize", "{fx}/unknown", "--out", "{out}", *Q, culprit="nopeformer"),
    case("q-pickle", "quantize", "{fx}/pickle", "--out", "{out}", *Q, culprit="pytorch_model.bin"),
    case("q-allow-pickle", "quantize", "{fx}/pickle", "--out", "{out}", *Q, "--allow-pickle", culprit="--allow-pickle"),
    case("e-tasks-ppl-none", "eval", "{m}", "--tasks", "nope", culprit="nope"),
    case("q-calib-no-text", "quantize", "{m}", "--out", "{out}", "--skip-eval", "--group-size", "32", "--calib",
         "{fx}/notext.jsonl", "--nsamples", "2", "--seqlen", "16", culprit="notext.jsonl"),
    case("q-calib-broken-jsonl", "quantize", "{m}", "--out", "{out}", "--skip-eval", "--group-size", "32", "--calib",
         "{fx}/broken.jsonl", "--nsamples", "2", "--seqlen", "16", culprit="broken.jsonl, line 2"),
    case("q-calib-binary", "quantize", "{m}", "--out", "{out}", "--skip-eval", "--group-size", "32", "--calib",
         "{fx}/binary.txt", "--nsamples", "2", "--seqlen", "16", culprit="binary.txt"),
    case("q-calib-empty", "quantize", "{m}", "--out", "{out}", "--skip-eval", "--group-size", "32", "--calib",
         "{fx}/empty.txt", "--nsamples", "2", "--seqlen", "16", culprit="empty.txt"),
    case("q-nsamples-0", "quantize", "{m}", "--out", "{out}", *Q, "--nsamples", "0", culprit="--nsamples", parse=True),
    case("q-seqlen-long", "quantize", "{m}", "--out", "{out}", *Q, "--seqlen", "100000", culprit="--seqlen"),
    case("q-limit-0", "quantize", "{m}", "--out", "{out}", "--limit", "0", culprit="--limit", parse=True),
    case("q-limit-neg", "quantize", "{m}", "--out", "{out}", "--limit", "-5", culprit="--limit", parse=True),
    case("q-damp", "quantize", "{m}", "--out", "{out}", "--damp", "1.5", culprit="--damp", parse=True),
    case("q-data-dir", "quantize", "{m}", "--out", "{out}", *Q, "--data-dir", "/nonexistent", culprit="/nonexistent"),
    case("q-tasks", "quantize", "{m}", "--out", "{out}", "--tasks", "nope", culprit="nope"),
    case("q-plan-missing", "quantize", "{m}", "--out", "{out}", "--plan", "{fx}/no-plan.yaml", culprit="no-plan.yaml"),
    # ------------------------------------------------------------------ eval
    case("e-ppl-limit-0", "eval", "{m}", "--ppl-limit", "0", culprit="--ppl-limit", parse=True),
    case("e-ppl-limit-neg", "eval", "{m}", "--ppl-limit", "-1", culprit="--ppl-limit", parse=True),
    case("e-seqlen-long", "eval", "{m}", "--seqlen", "100000", culprit="--seqlen"),
    case("e-against", "eval", "{m}", "--against", "nope", culprit="--against"),
    case("e-json-proc", "eval", "{m}", "--json", "/proc/x/e.json", culprit="--json"),
    case("e-json-folder", "eval", "{m}", "--json", "{fx}", culprit="--json"),
    case("e-pickle", "eval", "{fx}/pickle", culprit="--allow-pickle"),
    case("e-truncated", "eval", "{fx}/trunc", culprit="model.safetensors"),
    case("e-more-layers", "eval", "{fx}/more", culprit="missing"),
    case("e-data-dir", "eval", "{m}", "--data-dir", "/nonexistent", culprit="/nonexistent"),
    case("e-ppl-set", "eval", "{m}", "--ppl", "nope", culprit="--ppl"),
    case("e-fewshot", "eval", "{m}", "--num-fewshot", "mmlu=-1", culprit="--num-fewshot", parse=True),
    # ------------------------------------------------------------------ calib
    case("ce-length-long", "calib", "ebss", "{m}", "--length", "100000", "--out", "{out}.jsonl", culprit="--length"),
    case("ce-num-0", "calib", "ebss", "{m}", "--num", "0", "--out", "{out}.jsonl", culprit="--num", parse=True),
    case("ce-tau-0", "calib", "ebss", "{m}", "--tau", "0", "--out", "{out}.jsonl", culprit="--tau", parse=True),
    case("ce-out-proc", "calib", "ebss", "{m}", "--out", "/proc/x", culprit="/proc"),
    case("ce-out-folder", "calib", "ebss", "{m}", "--out", "{fx}", culprit="--out"),
    case("cs-seqlen-0", "calib", "stats", "{m}", "--calib", "wikitext2", "--seqlen", "0", culprit="--seqlen",
         parse=True),
    case("cs-seqlen-long", "calib", "stats", "{m}", "--calib", "wikitext2", "--seqlen", "100000", culprit="--seqlen"),
    case("cs-calib-no-text", "calib", "stats", "{m}", "--calib", "{fx}/notext.jsonl", "--seqlen", "16",
         culprit="notext.jsonl"),
    case("cs-json-proc", "calib", "stats", "{m}", "--calib", "wikitext2", "--json", "/proc/x/s.json", culprit="--json"),
    case("cs-data-dir", "calib", "stats", "{m}", "--calib", "wikitext2", "--data-dir", "/nonexistent",
         culprit="/nonexistent"),
    # ------------------------------------------------------------------ plan / profile
    case("pl-avg-bits-1", "plan", "{m}", "--out", "{out}.yaml", "--avg-bits", "1", culprit="--avg-bits"),
    case("pl-avg-bits-0", "plan", "{m}", "--out", "{out}.yaml", "--avg-bits", "0", culprit="--avg-bits", parse=True),
    case("pl-subcommand-usage", "plan", "{m}", "--out", "{out}.yaml", "--no-predictor", culprit="--no-predictor",
         parse=True),
    case("pl-no-sensitivity", "plan", "--profile", "{fx}/nosens", "--avg-bits", "3", "--out", "{out}.yaml",
         culprit="no sensitivities"),
    case("pl-out-suffix", "plan", "{m}", "--out", "{out}.txt", culprit=".txt"),
    case("pl-out-proc", "plan", "{m}", "--out", "/proc/x.yaml", culprit="/proc"),
    case("pr-candidates-empty", "profile", "{m}", "--candidates", "", "--out", "{out}", culprit="--candidates",
         parse=True),
    case("pr-candidates-9", "profile", "{m}", "--candidates", "2,9", "--out", "{out}", culprit="--candidates",
         parse=True),
    case("pr-unknown-type", "profile", "{fx}/unknown", "--out", "{out}", culprit="nopeformer"),
    # ------------------------------------------------------------------ bench
    case("b-grid-malformed", "bench", "{m}", "--out", "{out}", "--grid", "{fx}/bad.yaml", culprit="bad.yaml"),
    case("b-grid-missing", "bench", "{m}", "--out", "{out}", "--grid", "{fx}/no-grid.yaml", culprit="no-grid.yaml"),
    case("b-grid-key", "bench", "{m}", "--out", "{out}", "--grid", "{fx}/badkey.yaml", culprit="bitz"),
    case("b-grid-type", "bench", "{m}", "--out", "{out}", "--grid", "{fx}/badtype.yaml", culprit="methods"),
    case("b-tasks", "bench", "{m}", "--out", "{out}", "--tasks", "nope", culprit="nope"),
    case("b-group-size-48", "bench", "{m}", "--out", "{out}", "--group-size", "48", culprit="group size 48"),
    case("b-bits-9", "bench", "{m}", "--out", "{out}", "--bits", "4,9", culprit="--bits", parse=True),
    case("b-method", "bench", "{m}", "--out", "{out}", "--methods", "rtn,nope", culprit="nope"),
    case("b-out-file", "bench", "{m}", "--out", "{fx}/afile.txt", culprit="afile.txt"),
    # ------------------------------------------------------------------ models / methods
    case("models-flag", "models", "--bogus", culprit="--bogus", parse=True),
    case("methods-arg", "methods", "extra", culprit="extra", parse=True),
]
# the one row that must succeed: a plain text file that is not in the data folder's named sources
OK = Case("q-calib-raw-file", ("quantize", "{m}", "--out", "{out}", "--skip-eval", "--group-size", "32", "--calib",
                               "{raw}", "--nsamples", "2", "--seqlen", "16"), "", code=0)


# ---------------------------------------------------------------------------------------------- fixtures
def _variant(fx: Path, src: Path, name: str, **config) -> Path:
    d = fx / name
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **config}))
    return d


def _checkpoints(fx: Path, src: Path) -> None:
    """Broken checkpoints next to a good one: wrong layer counts, unknown type, truncated, pickle only."""
    shutil.copytree(src, fx / "mix")
    shutil.copytree(src, fx / "victim")
    _variant(fx, src, "more", num_hidden_layers=4)
    _variant(fx, src, "fewer", num_hidden_layers=1)
    _variant(fx, src, "unknown", model_type="nopeformer")
    t = _variant(fx, src, "trunc") / "model.safetensors"
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    p = _variant(fx, src, "pickle")
    torch.save(load_file(p / "model.safetensors"), p / "pytorch_model.bin")
    (p / "model.safetensors").unlink()


def _files(fx: Path) -> None:
    """Bad calibration files, grids, a profile without sensitivities, a foreign output folder, a plain file."""
    (fx / "notext.jsonl").write_text('{"content": "no text field"}\n')
    (fx / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (fx / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (fx / "empty.txt").write_text("")
    (fx / "bad.yaml").write_text("methods: [rtn\nbits: 4\n")
    (fx / "badkey.yaml").write_text("methods: [rtn]\nbitz: [4]\n")
    (fx / "badtype.yaml").write_text("methods: rtn\n")
    (fx / "afile.txt").write_text("not a folder\n")
    (fx / "existing").mkdir()
    (fx / "existing" / "keep.txt").write_text("precious\n")
    (fx / "nosens").mkdir()
    (fx / "nosens" / "profile.json").write_text(json.dumps(
        {"format": "moeq-profile", "version": 1, "model": "m", "model_type": "mixtral", "modules": [],
         "candidates": [], "sensitivity": {}}))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _run(c: Case, fx: Path, work: Path, raw: str) -> subprocess.CompletedProcess:
    work.mkdir()
    argv = [a.format(m=fx / "mix", fx=fx, out=work / "o", raw=raw) for a in c.argv]
    env = {k: v for k, v in os.environ.items() if k != "MOEQ_DATA_DIR"}
    env.update(PYTHONPATH=SRC, MOEQ_QUIET="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="100")
    try:
        return subprocess.run([sys.executable, "-m", "moeq.cli", *argv], cwd=work, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:  # a hang fails its own row, not the table
        return subprocess.CompletedProcess(e.cmd, -9, "", f"timed out after {TIMEOUT}s (killed)")


@pytest.fixture(scope="module")
def runs(tiny_ckpt, tmp_path_factory):
    """Every row run once, two at a time: {name: (result, its work folder)}, plus the fixtures' snapshots."""
    from moeq.calib.sources import data_root

    root = tmp_path_factory.mktemp("bad-input")
    fx = root / "fixtures"
    fx.mkdir()
    _checkpoints(fx, Path(tiny_ckpt("mixtral")))
    _files(fx)
    before = _snapshot(fx)
    data = data_root()
    raw = data / "wikitext2_raw" / "wiki.valid.raw" if data is not None else None
    rows = CASES + ([OK] if raw is not None and raw.is_file() else [])
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip((c.name for c in rows),
                           pool.map(lambda c: _run(c, fx, root / c.name, str(raw)), rows)))
    return {"results": results, "root": root, "fx": fx, "before": before, "after": _snapshot(fx)}


# ---------------------------------------------------------------------------------------------- checks
def _command(c: Case) -> str:
    return " ".join(c.argv[:2]) if c.argv[0] == "calib" else c.argv[0]


def test_the_table_covers_every_subcommand():
    assert len(CASES) >= 45
    assert {_command(c).split()[0] for c in CASES} == {"quantize", "eval", "calib", "plan", "profile", "bench",
                                                      "models", "methods"}
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.name)
def test_bad_input_is_one_clear_error_and_writes_nothing(c, runs):
    r, work = runs["results"][c.name], runs["root"] / c.name
    err = r.stderr
    assert r.returncode == c.code, f"exit {r.returncode}\n{err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    prefix = f"moeq {_command(c)}: error:"
    if c.parse_error:
        assert err.startswith(f"usage: moeq {_command(c)}"), err  # the subcommand's usage, not the top-level one
        assert lines[-1].startswith(prefix) and sum("error:" in ln for ln in lines) == 1, err
    else:
        assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert c.culprit in lines[-1], err
    assert not list(work.iterdir()), f"left behind: {[p.name for p in work.iterdir()]}"


def test_no_fixture_was_touched(runs):
    assert runs["after"] == runs["before"]


def test_a_raw_text_file_is_a_valid_calibration_set(runs):
    if OK.name not in runs["results"]:
        pytest.skip("WikiText-2's raw validation file is not in the data folder")
    r = runs["results"][OK.name]
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert (runs["root"] / OK.name / "o" / "report.json").is_file()
    assert not [p for p in (runs["root"] / OK.name).iterdir() if p.name.startswith(".")]  # no partial left
