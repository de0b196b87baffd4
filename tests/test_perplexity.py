"""Perplexity and bits per byte against a plain, independent loop."""

import math

import pytest
import torch

from conftest import tiny_model
from moeq.evaluate.perplexity import Windows, c4_windows, default_seqlen, perplexity, wikitext2_windows


def test_wikitext_windows_follow_the_papers(tokenizer):
    w = wikitext2_windows(tokenizer, 128)
    with open(__import__("moeq.calib.sources", fromlist=["x"]).load_text("wikitext2").origin) as f:
        text = "\n\n".join(f.read().splitlines(keepends=True))
    ids = tokenizer(text)["input_ids"]
    assert w.ids.shape == (len(ids) // 128, 128)
    assert w.ids.flatten().tolist() == ids[: w.ids.numel()]
    # bytes covered by predicted tokens: the text between the first and last token ends of a window
    first = tokenizer.decode(w.ids[0, 1:].tolist())
    assert int(w.nbytes[0]) == len(first.encode("utf-8"))


def test_c4_windows_are_seeded_and_from_long_documents(tokenizer):
    a, b = c4_windows(tokenizer, 64, n=8), c4_windows(tokenizer, 64, n=8)
    assert a.ids.shape == (8, 64) and torch.equal(a.ids, b.ids)
    assert not torch.equal(a.ids, c4_windows(tokenizer, 64, n=8, seed=1).ids)


def test_ppl_and_bpb_match_an_independent_loop(tokenizer):
    m = tiny_model("qwen2_moe")
    w = wikitext2_windows(tokenizer, 64)
    w = Windows(w.ids[:6], w.nbytes[:6], w.name, w.origin)
    got = perplexity(m, w, batch_size=4)
    nll_sum, n_tok = 0.0, 0
    with torch.no_grad():
        for row in w.ids:
            out = m(input_ids=row[None], labels=row[None])  # HF shifts labels itself; mean over 63 tokens
            nll_sum += out.loss.item() * (row.numel() - 1)
            n_tok += row.numel() - 1
    assert math.isclose(got["ppl"], math.exp(nll_sum / n_tok), rel_tol=1e-5)
    assert math.isclose(got["bpb"], nll_sum / math.log(2) / int(w.nbytes.sum()), rel_tol=1e-5)
    assert got["tokens"] == n_tok


def test_seqlen_checks():
    m = tiny_model("mixtral")  # 256 positions
    assert default_seqlen(m) == 256
    with pytest.raises(ValueError, match="longer than the model's context"):
        default_seqlen(m, 4096)
