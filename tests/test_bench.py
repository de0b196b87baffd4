"""moeq bench: grid cells, caching/resume, outputs."""

import json

import pytest

import moeq.bench as bench
from moeq.bench import Grid


def test_grid_cells_and_validation():
    g = Grid(methods=["rtn", "gptq", "moequant"], bits=[4, 3], calib=["wikitext2", "c4"])
    cells = g.cells()
    assert cells[0]["method"] == "fp"
    assert sum(c["method"] == "gptq" for c in cells) == 4  # 2 bits x 2 calibration sets
    assert all(c["calib"] == "ebss" for c in cells if c["method"] == "moequant")
    assert all(c["calib"] is None for c in cells if c["method"] == "rtn")
    with pytest.raises(ValueError, match="unknown bench method"):
        Grid(methods=["gguf"])
    with pytest.raises(ValueError, match="2..8"):
        Grid(bits=[12])


def test_bench_writes_tables_and_resumes(tiny_ckpt, tmp_path, monkeypatch):
    g = Grid(model=str(tiny_ckpt("mixtral")), methods=["rtn", "gptq"], bits=[4], group_size=32, nsamples=4,
             seqlen=64, ppl=["wikitext2"], ppl_limit=3, tasks=["copa"], limit=2)
    res = bench.run(g, tmp_path / "b")
    assert [r["method"] for r in res] == ["fp", "rtn", "gptq"]
    for f in ("results.json", "results.csv", "results.md", "bar_wikitext2.png", "ppl_vs_bits.png", "grid.json"):
        assert (tmp_path / "b" / f).is_file(), f
    md = (tmp_path / "b" / "results.md").read_text()
    assert "wikitext2 PPL" in md and "copa acc" in md and "gptq W4 (wikitext2)" in md
    cell = res[2]
    assert cell["seconds"]["quantize"] > 0 and cell["seconds"]["calibration"] > 0 and cell["peak_rss_mb"] > 0
    # a rerun reads every cell from the cache and computes nothing
    monkeypatch.setattr(bench, "run_cell", lambda *a, **k: pytest.fail("cell recomputed"))
    again = bench.run(g, tmp_path / "b")
    assert json.dumps(again, sort_keys=True) == json.dumps(res, sort_keys=True)
