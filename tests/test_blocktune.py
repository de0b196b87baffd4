"""The block tuner (--method blocktune): it never ends above its GPTQ start on its own calibration loss, it
stays on the integer grid, and its router term keeps the quantized model's expert choices closer to FP's.
(Its exported integers reloading to the tuned in-memory model is covered with every method in
test_export_loads.py.)"""

from __future__ import annotations

import torch
import transformers as T

from moeq.calib.windows import calibration_windows
from moeq.config import BitPlan, CalibSpec, QuantConfig
from moeq.models.loading import cast_floating
from moeq.pipeline import quantize
from moeq.quant.primitives import QuantArgs
from moeq.solvers.blocktune import TuneKnobs, tune_block
from moeq.solvers.gptq import gptq

G = torch.Generator().manual_seed(0)
ARGS = QuantArgs(2, 16, True)


def _toy():
    """A two-layer MLP 'block' y = W2 relu(W1 x), its calibration batches and GPTQ starts for both linears."""
    fp = {"l1": torch.randn(32, 48, generator=G) * 0.3, "l2": torch.randn(48, 32, generator=G) * 0.3}  # (out, in)
    xs = [torch.randn(64, 48, generator=G) for _ in range(16)]  # batches (n, in); the last 2 held out
    batches = [(x, None) for x in xs]
    H1 = sum(x.T @ x for x in xs) / (16 * 64)  # (48, 48)
    h = [torch.relu(x @ fp["l1"].T) for x in xs]  # (n, 32)
    H2 = sum(a.T @ a for a in h) / (16 * 64)
    start = {"l1": gptq(fp["l1"], H1, ARGS, positions=True)[0], "l2": gptq(fp["l2"], H2, ARGS, positions=True)[0]}

    def block_loss(W, batch):
        x, _ = batch
        y_fp = torch.relu(x @ fp["l1"].T) @ fp["l2"].T  # (n, 48)
        y = torch.relu(x @ W["l1"].T) @ W["l2"].T
        return (y - y_fp).pow(2).sum() / y_fp.pow(2).sum()
    return start, batches, block_loss


def _calib_loss(results, batches, block_loss) -> float:
    """The loss recomputed from the returned grids alone (independent of the tuner's own bookkeeping)."""
    W = {n: r.dequantize() for n, r in results.items()}
    return sum(float(block_loss(W, b)) for b in batches) / len(batches)


def test_tuner_lowers_its_calibration_loss_and_stays_on_the_grid():
    start, batches, loss = _toy()
    tuned, info = tune_block(start, batches, loss, TuneKnobs(steps=60), "cpu")
    before, after = _calib_loss(start, batches, loss), _calib_loss(tuned, batches, loss)
    assert info["kept"] == "tuned" and after < 0.95 * before
    assert abs(info["loss_start"] - before) < 1e-5 and abs(info["loss_end"] - after) < 1e-5
    for n in start:
        q, q0 = tuned[n].q.int(), start[n].q.int()
        assert (q - q0).abs().max() <= 1  # at most one grid step from GPTQ's integers
        assert ARGS.qmin <= int(q.min()) and int(q.max()) <= ARGS.qmax
        assert ((tuned[n].scale / start[n].scale - 1).abs() <= 0.2 + 1e-6).all()
        assert not torch.equal(tuned[n].scale, start[n].scale)


def test_zero_steps_return_the_start_exactly():
    start, batches, loss = _toy()
    tuned, info = tune_block(start, batches, loss, TuneKnobs(steps=0), "cpu")
    for n in start:  # the tuner's start state (positions + V = 0) is GPTQ's grid, integer for integer
        assert torch.equal(tuned[n].q, start[n].q) and torch.equal(tuned[n].scale, start[n].scale)


def test_tuner_never_ends_above_its_start():
    start, batches, loss = _toy()
    # a step far too large scrambles the grid: the tuner must hand back its start unchanged
    tuned, info = tune_block(start, batches, loss, TuneKnobs(steps=5, lr=5.0, scale_lr=0.5, max_scale=0.9), "cpu")
    assert info["kept"] == "start"
    for n in start:
        assert torch.equal(tuned[n].q, start[n].q) and torch.equal(tuned[n].scale, start[n].scale)
    assert _calib_loss(tuned, batches, loss) <= _calib_loss(start, batches, loss) + 1e-7


def test_scales_stay_in_the_storage_dtype():
    start, batches, loss = _toy()
    tuned, _ = tune_block(start, batches, loss, TuneKnobs(steps=20), "cpu", torch.bfloat16)
    for r in tuned.values():
        assert torch.equal(r.scale, r.scale.to(torch.bfloat16).float())


def _topk_agreement(model, fp, ids) -> float:
    """Mean |top-k(quantized) & top-k(FP)| / k over tokens and MoE layers, from the models' own router logits."""
    with torch.no_grad():
        lq = model(input_ids=ids, output_router_logits=True).router_logits
        lf = fp(input_ids=ids, output_router_logits=True).router_logits
    k, agree = fp.config.num_experts_per_tok, []
    for a, b in zip(lq, lf):
        ta, tb = a.topk(k, -1).indices, b.topk(k, -1).indices  # (N, k)
        agree.append((ta[:, :, None] == tb[:, None, :]).any(-1).float().mean())
    return float(torch.stack(agree).mean())


def test_router_term_reduces_topk_disagreement(tiny_ckpt, tokenizer):
    ckpt = tiny_ckpt("qwen2_moe")
    fp = T.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = calibration_windows(tokenizer, "wikitext2", 16, 64).ids  # the tuner's own calibration windows
    agreement = {}
    for router in (0.0, 20.0):
        cfg = QuantConfig(method="blocktune", plan=BitPlan(default=QuantArgs(2, 32, True)),
                          calib=CalibSpec("wikitext2", nsamples=16, seqlen=64),
                          tune=TuneKnobs(steps=40, router=router, expert=0.0))
        _, m = quantize(str(ckpt), cfg, None, skip_eval=True, return_model=True)
        agreement[router] = _topk_agreement(m, fp, ids)
    assert 1 - agreement[20.0] < 0.9 * (1 - agreement[0.0]), agreement


def test_tuned_integers_reload_exactly(tiny_ckpt, tmp_path):
    """The export holds the tuned grid: transformers reloads it with moeq's in-memory logits, and the tuner did
    move integers (so the check is not one of an untouched GPTQ/RTN grid)."""
    ckpt = tiny_ckpt("mixtral")
    cfg = QuantConfig(method="blocktune", plan=BitPlan(default=QuantArgs(2, 32, True)),
                      calib=CalibSpec("wikitext2", nsamples=16, seqlen=64), tune=TuneKnobs(steps=30))
    rep, m = quantize(str(ckpt), cfg, tmp_path / "o", skip_eval=True, return_model=True)
    rows = rep["modules"]
    assert sum(r.get("tuned_moved", 0) for r in rows) > 0
    assert any(r["tune_block_loss"]["kept"] == "tuned" for r in rows)
    ids = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(3))
    r = T.AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    with torch.no_grad():
        r(input_ids=ids[:, :4])  # the first forward decompresses the packed linears
        cast_floating(r, torch.float32)
        assert float((r(input_ids=ids).logits - m(input_ids=ids).logits).abs().max()) < 1e-4


def test_steps_run_in_the_requested_precision():
    """bf16 autocast for the steps when asked (or, with "auto", where bf16 matmuls are native); the measurements
    that choose the result stay fp32, so the never-above-the-start check is the fp32 loss in both modes."""
    from moeq.solvers.blocktune import fast_bf16, step_autocast

    x, w = torch.randn(4, 8), torch.randn(3, 8)
    for precision, want in (("bf16", torch.bfloat16), ("fp32", torch.float32),
                            ("auto", torch.bfloat16 if fast_bf16("cpu") else torch.float32)):
        with step_autocast("cpu", precision):
            assert torch.nn.functional.linear(x, w).dtype == want, precision
    G.manual_seed(0)  # the first test's toy, whatever ran before
    start, batches, loss = _toy()
    seen = []

    def recording(W, batch):
        seen.append((torch.nn.functional.linear(batch[0][:1], W["l1"]).dtype, torch.is_grad_enabled()))
        return loss(W, batch)
    for precision in ("bf16", "fp32"):
        seen.clear()
        tuned, info = tune_block(start, batches, recording, TuneKnobs(steps=60, precision=precision), "cpu")
        steps = {d for d, grad in seen if grad}  # the steps run with gradients, the measurements without
        assert steps == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert {d for d, grad in seen if not grad} == {torch.float32}
        assert info["kept"] == "tuned" and info["loss_end"] < info["loss_start"]
        assert abs(info["loss_end"] - _calib_loss(tuned, batches, loss)) < 1e-5
