"""Offline data resolution, calibration windows and their error messages."""

import json

import pytest

from moeq.calib.sources import DataNotFoundError, data_root, load_text
from moeq.calib.windows import calibration_windows


def test_named_sources_resolve_offline():
    assert data_root() is not None, "../shared/data must be found next to the repository"
    wt = load_text("wikitext2")
    assert wt.split == "test" and wt.origin.endswith("wiki.test.raw") and len(wt.docs) == 4358
    c4 = load_text("c4")
    assert c4.split == "validation" and len(c4.docs) == 1025
    assert len(load_text("gsm8k", purpose="calib").docs) == 7473
    assert len(load_text("humaneval", purpose="calib").docs) == 164


def test_wikitext_calibration_never_uses_the_test_split():
    cal = load_text("wikitext2", purpose="calib")
    assert cal.split == "validation" and cal.origin.endswith("wiki.valid.raw")
    assert cal.notes and "validation split" in cal.notes[0]
    assert load_text("c4", purpose="calib").origin.endswith("c4_train_sample_1000.jsonl")


def test_explicit_dir_then_env_var(tmp_path, monkeypatch):
    (tmp_path / "wikitext2_raw").mkdir()
    (tmp_path / "wikitext2_raw" / "wiki.test.raw").write_text(" = A = \n hello world \n")
    assert load_text("wikitext2", data_dir=tmp_path).origin == str(tmp_path / "wikitext2_raw" / "wiki.test.raw")
    monkeypatch.setenv("MOEQ_DATA_DIR", str(tmp_path))
    assert load_text("wikitext2").origin.startswith(str(tmp_path))


def test_missing_data_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MOEQ_DATA_DIR", str(tmp_path))
    import moeq.calib.sources as S
    monkeypatch.setattr(S, "_candidates", lambda d: [tmp_path])
    with pytest.raises(DataNotFoundError, match="MOEQ_DATA_DIR"):
        load_text("c4")


def test_file_sources_and_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 50)
    assert load_text(str(tmp_path / "a.txt")).docs[0].startswith("some text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x y z"}) + "\n")
    assert load_text(str(tmp_path / "b.jsonl")).docs == ["x y z"]
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match="no text"):
        load_text(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="unknown text source"):
        load_text("pile")


def test_calibration_windows_are_deterministic(tokenizer):
    a = calibration_windows(tokenizer, "wikitext2", 4, 64, seed=3)
    b = calibration_windows(tokenizer, "wikitext2", 4, 64, seed=3)
    c = calibration_windows(tokenizer, "wikitext2", 4, 64, seed=4)
    assert a.ids.shape == (4, 64) and (a.ids == b.ids).all() and not (a.ids == c.ids).all()


def test_calibration_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        calibration_windows(tokenizer, "wikitext2", 0, 64)
    (tmp_path / "short.txt").write_text("only a few words")
    with pytest.raises(ValueError, match="shorter --seqlen"):
        calibration_windows(tokenizer, str(tmp_path / "short.txt"), 2, 64)


def test_token_id_jsonl_is_used_as_is(tmp_path, tokenizer):
    rows = [{"input_ids": list(range(i, i + 70)), "text": "t"} for i in range(3)]
    p = tmp_path / "ids.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cs = calibration_windows(tokenizer, str(p), 2, 64)
    assert cs.ids.tolist() == [list(range(0, 64)), list(range(1, 65))]
