"""MoEQuant: the balance metric, EBSS beam bookkeeping, and affinity-guided Hessians."""

import math

import pytest
import torch

from conftest import tiny_model
from moeq.calib.ebss import EBSSConfig, generate, sequence_sigma
from moeq.capture.hooks import capture_first_block_inputs, block_output
from moeq.capture.stats import GroupStats, row_weight_fn
from moeq.evaluate.routing import balance_std
from moeq.models.adapter import ModelAdapter, routing_weights


class Tok:
    """Minimal tokenizer stand-in for generation on tiny random models."""
    all_special_ids = [0]
    eos_token_id = 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_balance_std_matches_the_paper_formula():
    counts = {0: [10, 0, 30, 20], 1: [5, 5, 5, 5]}
    f = [x / 60 for x in counts[0]]
    mean = sum(f) / 4
    std0 = math.sqrt(sum((x - mean) ** 2 for x in f) / 3)  # sample std, 1/(E-1)
    assert balance_std(counts) == pytest.approx((std0 + 0.0) / 2)
    assert balance_std({0: [7, 7, 7]}) == 0.0
    c = torch.tensor([[[10, 0, 30, 20], [5, 5, 5, 5]]])
    assert float(sequence_sigma(c)[0]) == pytest.approx((std0 + 0.0) / 2, rel=1e-6)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_fast_top_w_expansion_equals_full_vocabulary_expansion(arch):
    m = tiny_model(arch, vocab=300)
    fast, _ = generate(m, Tok(), EBSSConfig(num=3, length=10, width=3, tau=0.05, seed=1, batch=2))
    full, _ = generate(m, Tok(), EBSSConfig(num=3, length=10, width=3, tau=0.05, seed=1, batch=2,
                                            full_expansion=True))
    assert [r["input_ids"] for r in fast] == [r["input_ids"] for r in full]
    assert all(len(r["input_ids"]) == 10 and 0 not in r["input_ids"] for r in fast)  # no EOS/special


def _beam_reference(m, first, L, w, tau):
    """Plain beam search without KV cache or batching: re-runs every candidate prefix from scratch."""
    ad = ModelAdapter.for_model(m)

    def score(seq):
        counts = []
        hooks = []
        for i in ad.moe_blocks():
            hooks.append(ad.experts(i).register_forward_pre_hook(
                lambda mod, args: counts.append(torch.bincount(args[1].reshape(-1), minlength=ad.num_experts))))
        with torch.no_grad():
            logits = m(input_ids=torch.tensor([seq])).logits[0]
        for h in hooks:
            h.remove()
        c = torch.stack(counts)[None]  # (1, L_moe, E)
        return torch.log_softmax(logits[-1].double(), -1), float(sequence_sigma(c)[0])

    beams = [([first], 0.0)]
    for l in range(1, L):
        cands = []
        for seq, R in beams:
            lp, sig = score(seq)
            lp[0] = float("-inf")
            for v in range(lp.numel()):
                cands.append((-(R + lp[v].item()) / (l + 1) + sig / tau, seq + [v], R + lp[v].item()))
        cands.sort(key=lambda c: c[0])
        beams = [(s, R) for _, s, R in cands[:w]]
    final = []
    for seq, R in beams:
        _, sig = score(seq)
        final.append((-R / (L - 1) + sig / tau, seq))
    return min(final)[1]


def test_batched_beam_search_matches_a_plain_reference():
    m = tiny_model("qwen2_moe", vocab=64)
    rows, _ = generate(m, Tok(), EBSSConfig(num=2, length=6, width=2, tau=0.1, seed=3, batch=2))
    for r in rows:
        assert r["input_ids"] == _beam_reference(m, r["input_ids"][0], 6, 2, 0.1)


def test_lower_tau_gives_more_balanced_sequences():
    m = tiny_model("qwen2_moe", vocab=300)
    loose, _ = generate(m, Tok(), EBSSConfig(num=4, length=24, width=4, tau=100.0, seed=0, batch=4))
    tight, _ = generate(m, Tok(), EBSSConfig(num=4, length=24, width=4, tau=0.01, seed=0, batch=4))
    mean = lambda rows: sum(r["balance_std"] for r in rows) / len(rows)
    assert mean(tight) < mean(loose)


@pytest.mark.parametrize("agq_gate", [True, False])
def test_agq_hessian_equals_an_independent_computation(agq_gate):
    m = tiny_model("qwen2_moe")
    ad = ModelAdapter.for_model(m).unfuse()
    ids = torch.randint(1, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    (hidden, kw), = capture_first_block_inputs(m, ad.blocks[0], [ids])
    block = ad.blocks[0]
    # independent: the post-attention-norm input of the MoE, routing from the router weights
    seen = {}
    h = block.mlp.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0].reshape(-1, 64)))
    block_output(block, hidden, kw, "cpu")
    h.remove()
    x = seen["x"]  # (N, H)
    idx, w = routing_weights(x @ ad.router(0).weight.T, ad)
    # moeq: the gate/up group of block 0 with AGQ
    names = ad.groups(0)[2]
    mods = {f"model.layers.0.{n}": ad.module(f"model.layers.0.{n}") for n in names}
    with ad.routing(0) as r:
        gs = GroupStats(mods, "cpu", row_weight_fn(r, True, () if agq_gate else ("gate_proj",)))
        with gs:
            gs.new_forward()
            block_output(block, hidden, kw, "cpu")
    for e in range(ad.num_experts):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        c = w[rows, slot]
        X = x[rows]
        H_ref = (X * c[:, None]).T @ X / len(rows)
        for proj in ("gate_proj", "up_proj"):
            name = f"model.layers.0.mlp.experts.{e}.{proj}"
            st = gs.stats[gs.owner(name)]
            want = X.T @ X / len(rows) if (proj == "gate_proj" and not agq_gate) else H_ref
            torch.testing.assert_close(st.mean(), want, rtol=1e-4, atol=1e-6)
            assert st.routed == len(rows)
    cs = torch.sigmoid(x @ ad.shared_gate(0).weight.T).reshape(-1)  # shared expert: sigmoid gate
    for proj in ("gate_proj", "up_proj"):
        st = gs.stats[gs.owner(f"model.layers.0.mlp.shared_expert.{proj}")]
        want = x.T @ x if (proj == "gate_proj" and not agq_gate) else (x * cs[:, None]).T @ x
        torch.testing.assert_close(st.mean(), want / x.shape[0], rtol=1e-4, atol=1e-6)


def test_no_repeat_ngram_bans_exactly_the_tokens_that_repeat_an_ngram():
    from moeq.calib.ebss import EBSSConfig, _repeats

    ids = torch.tensor([[5, 6, 7, 5, 6], [1, 2, 3, 4, 2]])
    m = _repeats(ids, 3, 10)  # row 0 ends in (5, 6), seen before followed by 7; row 1 ends in (4, 2): new
    assert m[0].nonzero().flatten().tolist() == [7] and not m[1].any()
    m2 = _repeats(ids, 2, 10)  # bigrams: row 0 ends in 6 -> 7 banned; row 1 ends in 2 -> 3 banned
    assert m2[0].nonzero().flatten().tolist() == [7] and m2[1].nonzero().flatten().tolist() == [3]
    with pytest.raises(ValueError, match="no-repeat-ngram"):
        EBSSConfig(no_repeat_ngram=1)
