"""Offline data resolution, calibration windows and their error messages."""

import copy
import gzip
import json

import pytest
import transformers as T

from moeq.calib.sources import DataNotFoundError, data_root, load_text
from moeq.calib.windows import calibration_windows
from moeq.evaluate.perplexity import wikitext2_windows


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


# --------------------------------------------------------------------------- any file is text
TEXT = "The tower is 324 metres tall, about the same height as an 81-storey building.\n" * 40


def _occurs(row: list[int], ids: list[int]) -> bool:
    return any(ids[i:i + len(row)] == row for i in range(len(ids) - len(row) + 1))


@pytest.mark.parametrize("name", ["wiki.valid.raw", "README", "notes.md", "a.txt"])
def test_any_existing_file_is_plain_text(tmp_path, tokenizer, name):
    p = tmp_path / name
    p.write_text(TEXT, encoding="utf-8")
    assert load_text(str(p)).docs == [TEXT]
    cs = calibration_windows(tokenizer, str(p), 3, 32, seed=1)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert cs.ids.shape == (3, 32) and all(_occurs(r, ids) for r in cs.ids.tolist())  # windows of this text
    assert cs.origin == str(p)


def test_missing_paths_and_directories_say_so(tmp_path):
    with pytest.raises(ValueError, match="that path does not exist"):
        load_text(str(tmp_path / "wiki.valid.raw"))
    with pytest.raises(ValueError, match="that path is a directory"):
        load_text(str(tmp_path))


@pytest.mark.parametrize("name, content, problem", [
    ("model.raw", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "a NUL byte at offset 8"),
    ("latin1.txt", "caf\u00e9 au lait".encode("latin-1"), "not valid UTF-8 at byte offset 3"),
    ("blob.jsonl", b"\x00\x01\x02", "a NUL byte at offset 0"),
    ("empty", b"", "holds no text"),
    ("blank.raw", b"  \n\t\n  ", "holds no text"),
    ("blank.jsonl", b'{"text": "  "}\n', "holds no text"),
])
def test_binary_and_empty_files_are_one_line_errors(tmp_path, tokenizer, name, content, problem):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ValueError) as e:
        calibration_windows(tokenizer, str(p), 2, 32)
    msg = str(e.value)
    assert msg.startswith(str(p)) and problem in msg and "\n" not in msg
    assert "use a UTF-8 text file" in msg or "give it some text" in msg  # the fix


def test_jsonl_errors_name_the_line(tmp_path, tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r'd\.jsonl, line 3: no "text" field \(fields: body\)'):
        load_text(str(p))
    p.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(ValueError, match=r"d\.jsonl, line 2: not valid JSON"):
        calibration_windows(tokenizer, str(p), 2, 32)
    p.write_text(json.dumps({"input_ids": list(range(40))}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r'd\.jsonl, line 2: no "input_ids" field'):
        calibration_windows(tokenizer, str(p), 2, 32)


def test_json_jsonl_gz_and_parquet_sources(tmp_path, tokenizer):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    docs = [TEXT, "second document", "third \u2028 document"]  # U+2028 is not a line break in JSON Lines
    (tmp_path / "list.json").write_text(json.dumps([{"text": d} for d in docs]))
    rows = [{"id": i, "text": d} for i, d in enumerate(docs)]
    (tmp_path / "obj.json").write_text(json.dumps({"version": 1, "data": rows}))
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress("".join(
        json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()))
    pq.write_table(pa.table({"id": [0, 1, 2], "text": docs}), tmp_path / "table.parquet")
    for name in ("list.json", "obj.json", "rows.jsonl.gz", "table.parquet"):
        assert load_text(str(tmp_path / name)).docs == docs, name
    cs = calibration_windows(tokenizer, str(tmp_path / "table.parquet"), 2, 32)
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    assert all(_occurs(r, ids) for r in cs.ids.tolist())
    (tmp_path / "two.json").write_text(json.dumps({"a": [{"text": "x"}], "b": [{"text": "y"}]}))
    with pytest.raises(ValueError, match="exactly one list of rows .*found 2 list fields: a, b"):
        load_text(str(tmp_path / "two.json"))
    pq.write_table(pa.table({"body": docs}), tmp_path / "notext.parquet")
    with pytest.raises(ValueError, match=r'notext\.parquet: no "text" column \(columns: body\)'):
        load_text(str(tmp_path / "notext.parquet"))


def test_parquet_without_pyarrow_names_the_install(tmp_path, monkeypatch):
    import sys

    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"t\.parquet needs pyarrow: pip install pyarrow"):
        load_text(str(tmp_path / "t.parquet"))


# --------------------------------------------------------------------------- the caller's tokenizer
def _plain(v) -> bool:
    if isinstance(v, (dict, list, tuple)):
        return all(_plain(k) and _plain(x) for k, x in v.items()) if isinstance(v, dict) else all(map(_plain, v))
    return v is None or isinstance(v, (bool, int, float, str))


def test_windows_leave_the_callers_tokenizer_unchanged(bundled_dir):
    tok = T.AutoTokenizer.from_pretrained(bundled_dir)  # fresh: no earlier test touched it
    keys, state = set(vars(tok)), {k: copy.deepcopy(v) for k, v in vars(tok).items() if _plain(v)}
    assert tok.model_max_length == 512 and "deprecation_warnings" in state
    cal = calibration_windows(tok, "wikitext2", 2, 64)
    ev = wikitext2_windows(tok, 64)
    assert tok.model_max_length == 512 and set(vars(tok)) == keys
    assert {k: v for k, v in vars(tok).items() if _plain(v)} == state
    # the token ids are those of a tokenizer whose limit was raised (what moeq did before)
    ref = T.AutoTokenizer.from_pretrained(bundled_dir)
    ref.model_max_length = int(1e12)
    ids = ref(load_text("wikitext2", "test").joined())["input_ids"]
    assert ev.ids.flatten().tolist() == ids[:ev.ids.numel()]
    stream = ref(load_text("wikitext2", purpose="calib").joined(), add_special_tokens=False)["input_ids"]
    assert all(_occurs(r, stream) for r in cal.ids.tolist())
