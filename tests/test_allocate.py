"""Mixed precision: scores, rule plans, the budget search, plan files, serving constraints, mixed export."""

import copy
import itertools
import json
from dataclasses import replace
from fractions import Fraction

import pytest
import torch

from conftest import tiny_model
from moeq.allocate.gain import part_key
from moeq.allocate.modules import ModuleRecord, inventory, serving_units, serving_violations
from moeq.allocate.plan import PlanRules, Selection, build_plan, plan_stats, rule_bits
from moeq.allocate.planfile import load_plan, save_plan
from moeq.allocate.predictor import PredictorConfig, load_predictors
from moeq.allocate.profile import Profile, ProfileOptions, profile_model
from moeq.allocate.scores import outlier_score
from moeq.allocate.search import allocate, search
from moeq.cli import main
from moeq.config import BitPlan, CalibSpec, QuantConfig
from moeq.export.containers import storage_schemes
from moeq.models.adapter import ModelAdapter
from moeq.pipeline import quantize
from moeq.quant.primitives import QuantArgs, fake_quantize
from moeq.solvers.gptq import gptq
from test_pipeline import IDS, reload_logits

CALIB = torch.randint(0, 8192, (8, 32), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def prof():
    m = tiny_model("qwen2_moe", seed=2)
    ad = ModelAdapter.for_model(m)
    opts = ProfileOptions(template=QuantArgs(4, 32, True), batch_size=4,
                          predictor_cfg=PredictorConfig(hidden=32, epochs=5))
    p = profile_model(ad, CALIB, opts, QuantConfig(method="gptq"), torch.bfloat16, model_name="tiny")
    ad.unfuse()
    p.weights = {li.name: ad.module(li.name).weight.detach().clone() for li in ad.linears()}
    ad.refuse()
    return p


def _sum_bits(plan, mods) -> int:
    return sum(plan.args_for(r.name).num_bits * r.params for r in mods)


def test_outlier_score_matches_hand_computation(prof):
    W = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 0.0], [-2.0, 4.0, 0.0]])
    # column 0: max 3 / mean 2 = 1.5; column 1: 4 / 2 = 2; column 2 (all zero) scores 0
    assert outlier_score(W) == pytest.approx(2.0)
    name = next(iter(prof.outlier))
    W = prof.weights[name].float()
    by_hand = max(float(W[:, j].abs().max() / W[:, j].abs().mean()) for j in range(W.shape[1]))
    assert prof.outlier[name] == pytest.approx(by_hand, rel=1e-5)
    assert set(prof.outlier) == {r.name for r in prof.modules if r.role == "expert"}


def test_profile_measures_usage_and_importance(prof, tmp_path):
    assert prof.moe_blocks == [0, 1] and prof.num_experts == 8
    for b in prof.moe_blocks:  # every token goes to top_k experts
        assert sum(prof.usage[b]) == CALIB.numel() * prof.top_k
    assert set(prof.importance) == {0, 1}
    for v in prof.importance.values():
        assert -1 <= v["measured_cos"] <= 1 and v["score"] == pytest.approx(1 - v["predicted_cos"])
    assert set(prof.sensitivity) == {r.name for r in prof.modules}
    # JSON round trip keeps everything the planners read
    back = Profile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert back.sensitivity == prof.sensitivity and back.usage == prof.usage and back.modules == prof.modules


def _attention_hessians() -> dict[str, torch.Tensor]:
    """H_imp = sum_t x_t x_t^T / N (fp64) of every attention linear of the fixture's FP model on CALIB,
    from forward hooks (attention outputs are not scaled: c = 1)."""
    m = tiny_model("qwen2_moe", seed=2)
    H, hooks = {}, []
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".self_attn." in name:
            def hook(mod, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()  # (tokens, in)
                H[name] = H.get(name, 0) + x.T @ x
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in CALIB.split(4):
            m(input_ids=batch)
    for h in hooks:
        h.remove()
    return {n: h / CALIB.numel() for n, h in H.items()}


def _trace_error(W_hat: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    D = (W_hat.double() - W.double())  # (out, in)
    return float(torch.trace(D @ H @ D.T))


def test_attention_sensitivities_recomputed_from_hooks(prof):
    """Each attention linear's sensitivity, recomputed here: the raw GPTQ error tr(D H D^T) at each width
    (H from forward hooks, D from gptq on that H), times the block gain and made non-increasing in width
    (when the profile has gains). The raw errors themselves fall with width, and so do the RTN local
    errors behind the gains, which match too. Neither monotonicity is guaranteed: the grids do not nest
    (steps max/1.5, /3.5, /7.5, /127.5), a weight may land farther from the grid at more bits, and H
    weighs errors through its off-diagonal."""
    H = _attention_hessians()
    gains = prof.block_gain
    for b in prof.moe_blocks:
        rtn_err, attn = {}, [r for r in prof.modules if r.block == b and r.role == "attn"]
        for r in attn:
            n, best, raw = r.name, float("inf"), []
            W = prof.weights[n].float()
            for bits in sorted(prof.candidates):
                a = QuantArgs(bits, prof.group_size, prof.symmetric)
                W_hat = gptq(W, H[n].float(), a, scale_dtype=torch.bfloat16)[0].dequantize()  # (out, in)
                raw.append(_trace_error(W_hat, W, H[n]))
                best = min(best, raw[-1] * gains[part_key(r, bits)]["gain"]) if gains else raw[-1]
                assert prof.sensitivity[n][bits] == pytest.approx(best, rel=1e-3), (n, bits)
                rtn_err[bits] = rtn_err.get(bits, 0.0) + _trace_error(fake_quantize(W, a, torch.bfloat16), W, H[n])
            assert raw == sorted(raw, reverse=True) and raw[-1] < raw[0] / 1000, n
        assert list(rtn_err.values()) == sorted(rtn_err.values(), reverse=True)
        for bits, err in rtn_err.items() if gains else ():
            assert gains[part_key(attn[0], bits)]["local_error"] == pytest.approx(err, rel=1e-4)


def test_block_gains_calibrate_local_errors_to_the_measured_output_kl():
    """Calibrated sensitivity = local sensitivity x its part's gain (then non-increasing in width), and gain x
    local RTN error is the KL to the FP outputs measured independently (torch's kl_div) with only that part
    quantized."""
    m = tiny_model("qwen2_moe", seed=2)
    ad = ModelAdapter.for_model(m)
    base = ProfileOptions(template=QuantArgs(4, 32, True), batch_size=4, predictor=False, gain_samples=4)
    with_gain = profile_model(ad, CALIB, base, QuantConfig(method="gptq"), torch.bfloat16)
    local = profile_model(ad, CALIB, replace(base, block_gain=False), QuantConfig(method="gptq"), torch.bfloat16)
    widths = (2, 3, 4, 8)
    assert not local.block_gain and set(with_gain.block_gain) == {
        (b, p, w) for b in (0, 1) for p in ("attn", "ffn") for w in widths}
    assert all(with_gain.block_gain[(b, p, 2)]["gain"] > 0 for b in (0, 1) for p in ("attn", "ffn"))
    for r in with_gain.modules:
        part = "attn" if r.role == "attn" else "ffn"
        cal = [local.sensitivity[r.name][w] * with_gain.block_gain[(r.block, part, w)]["gain"] for w in widths]
        for k, w in enumerate(widths):  # calibrated, then non-increasing in width
            assert with_gain.sensitivity[r.name][w] == pytest.approx(min(cal[:k + 1]), rel=1e-6, abs=1e-12)

    ids = CALIB[:4]
    with torch.no_grad():
        fp = torch.log_softmax(m(input_ids=ids).logits.float(), -1)  # (4, T, V)
        ad.unfuse()
        names = [r.name for r in with_gain.modules if r.block == 1 and r.role != "attn"]
        for n in names:
            w = ad.module(n).weight
            w.data.copy_(fake_quantize(w.data.float(), QuantArgs(2, 32, True), torch.bfloat16).to(w.dtype))
        q = torch.log_softmax(m(input_ids=ids).logits.float(), -1)
        kl = float(torch.nn.functional.kl_div(q.flatten(0, 1), fp.flatten(0, 1), log_target=True,
                                              reduction="batchmean"))
    info = with_gain.block_gain[(1, "ffn", 2)]
    assert info["kl"] == pytest.approx(kl, rel=1e-3) and info["kl"] > 0
    assert info["gain"] * info["local_error"] == pytest.approx(info["kl"], rel=1e-9)


def test_avg_bits_formula(prof):
    mods = prof.modules
    plan = BitPlan(default=QuantArgs(2, 32), rules=[(r".*self_attn.*", QuantArgs(4, 32))],
                   overrides={mods[-1].name: QuantArgs(8, -1), mods[-2].name: None})
    st = plan_stats(plan, mods)
    quant = [r for r in mods if r.name != mods[-2].name]
    P = sum(r.params for r in quant)
    bits = {r.name: (4 if "self_attn" in r.name else 2) for r in quant}
    bits[mods[-1].name] = 8
    assert st["avg_bits"] == pytest.approx(sum(bits[r.name] * r.params for r in quant) / P)
    overhead = sum(r.out_features * (1 if r.name == mods[-1].name else r.in_features // 32) * 16 for r in quant)
    assert st["avg_bits_with_overhead"] == pytest.approx((sum(bits[r.name] * r.params for r in quant) + overhead) / P)
    assert st["fp_params"] == mods[-2].params and st["quantized_params"] == P


def test_rules_compose(prof):
    p = replace(prof, usage={0: [5, 90, 1, 1, 1, 1, 1, 1], 1: [1, 1, 1, 1, 1, 1, 1, 70]})
    rules = PlanRules(bits=2, attn_bits=4, shared_bits=8, group_size=32, freq_top=Selection(1, 4),
                      first_k=Selection(1, 3), serving_compatible=False)
    bits = rule_bits(p, rules)
    for r in p.modules:
        want = {"attn": 4, "shared": 8}.get(r.role)
        if r.role == "expert":
            top = {0: 1, 1: 7}[r.block]
            want = 4 if r.expert == top else (3 if r.block == 0 else 2)
        assert bits[r.name] == want, r.name
    # outlier rule: exactly the top 25% of expert linears by score are raised
    experts = [r.name for r in p.modules if r.role == "expert"]
    bits = rule_bits(p, PlanRules(bits=2, group_size=32, outlier_top=Selection(25, 4), serving_compatible=False))
    raised = {n for n in experts if bits[n] == 4}
    assert len(raised) == round(0.25 * len(experts))
    assert min(p.outlier[n] for n in raised) >= max(p.outlier[n] for n in experts if n not in raised)
    # alpha mix keeps the frequency rule's count of raised expert linears
    mixed = rule_bits(p, PlanRules(bits=2, group_size=32, freq_top=Selection(2, 4), alpha=0.5,
                                   serving_compatible=False))
    assert sum(mixed[n] == 4 for n in experts) == 2 * 2 * 3
    with pytest.raises(ValueError, match="whole number <= 8"):
        rule_bits(p, PlanRules(group_size=32, freq_top=Selection(9, 4)))


def test_random_baselines_reproducible_by_seed(prof):
    def raised(seed, **kw):
        bits = rule_bits(prof, PlanRules(bits=2, group_size=32, random_seed=seed, serving_compatible=False, **kw))
        return frozenset(n for n, b in bits.items() if b == 4)

    for kw in ({"freq_top": Selection(2, 4)}, {"outlier_top": Selection(25, 4)}, {"first_k": Selection(1, 4)}):
        runs = {s: raised(s, **kw) for s in (42, 43, 44)}
        assert raised(42, **kw) == runs[42]
        assert len({len(v) for v in runs.values()}) == 1 and len(runs[42]) == len(raised(None, **kw))
    freq = {s: raised(s, freq_top=Selection(2, 4)) for s in (42, 43, 44)}
    assert len(set(freq.values())) > 1


def test_budget_respected_exactly_and_search_is_pure(prof):
    before = copy.deepcopy(prof.to_dict())
    P = sum(r.params for r in prof.modules)
    last = None
    for budget in (2.0, 2.3, 2.77, 3.1, 4.5, 8):
        for method in ("knapsack", "greedy"):
            for serving in (False, True):
                res = search(prof, budget, method, serving)
                assert Fraction(_sum_bits(res.plan, prof.modules), P) <= Fraction(str(budget))
                assert res.avg_bits == pytest.approx(plan_stats(res.plan, prof.modules)["avg_bits"])
                if serving:
                    assert not serving_violations(res.plan, prof.modules)
        exact = search(prof, budget, serving_compatible=False)
        assert exact.exact and exact.predicted <= search(prof, budget, "greedy", False).predicted + 1e-9
        assert last is None or exact.predicted <= last + 1e-9  # more bits never predict more error
        last = exact.predicted
    # the knapsack plan is optimal, so no single linear can take a wider candidate within the budget it
    # left unused and lower the predicted error (fails for a search that wastes budget or picks badly)
    assert search(prof, 2.77, serving_compatible=False).exact
    plan = allocate(prof, 2.77, serving_compatible=False)
    bits = {r.name: plan.args_for(r.name).num_bits for r in prof.modules}
    left = Fraction("2.77") * P - sum(bits[r.name] * r.params for r in prof.modules)
    assert left >= 0
    sens = prof.sensitivity
    for r in prof.modules:
        for w in prof.candidates:
            if w > bits[r.name] and (w - bits[r.name]) * r.params <= left:
                assert sens[r.name][w] >= sens[r.name][bits[r.name]] - 1e-12, (r.name, w)
    assert search(prof, 2.77, serving_compatible=False).predicted == pytest.approx(sum(sens[n][b] for n, b in bits.items()))
    assert prof.to_dict() == before
    with pytest.raises(ValueError, match="below the lowest candidate"):
        allocate(prof, 1.9)


def test_knapsack_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(0)
    mods = [ModuleRecord(f"m{i}", 0, "attn", None, "q_proj", 32 * (i + 1), 32, f"u{i}") for i in range(5)]
    sens = {r.name: dict(zip((2, 3, 4, 8), sorted(torch.rand(4, generator=g).tolist(), reverse=True)))
            for r in mods}
    p = Profile("x", "llama", mods, candidates=[2, 3, 4, 8], group_size=32, sensitivity=sens)
    P = sum(r.params for r in mods)
    for budget in (2.5, 3.3, 4.9, 6.0):
        best = min(sum(sens[r.name][b] for r, b in zip(mods, combo))
                   for combo in itertools.product((2, 3, 4, 8), repeat=5)
                   if sum(b * r.params for r, b in zip(mods, combo)) <= budget * P)
        assert search(p, budget, serving_compatible=False).predicted == pytest.approx(best)


def test_serving_compatible_constraint(prof):
    rules = dict(bits=2, attn_bits=4, group_size=32, freq_top=Selection(2, 4), outlier_top=Selection(10, 8))
    loose = build_plan(prof, PlanRules(**rules, serving_compatible=False))
    assert any(v.startswith("0.experts") for v in serving_violations(loose, prof.modules))
    tight = build_plan(prof, PlanRules(**rules))  # the default
    assert not serving_violations(tight, prof.modules)
    units = serving_units(prof.modules)
    assert len(units["0.experts"]) == 8 * 3 and len(units["0.attn.0"]) == 3  # q, k, v fused
    assert {r.proj for r in units["0.shared.gate_up"]} == {"gate_proj", "up_proj"}
    for members in units.values():  # the tight plan raises each unit to its widest member
        assert len({tight.args_for(r.name).num_bits for r in members}) == 1


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_plan_save_load_round_trip(prof, tmp_path, suffix):
    plan = build_plan(prof, PlanRules(bits=2, attn_bits=4, shared_bits=8, group_size=32, freq_top=Selection(2, 3)))
    plan.overrides[prof.modules[0].name] = None
    plan.overrides[prof.modules[1].name] = QuantArgs(4, -1, False)
    plan.rules.append((r".*\.o_proj", QuantArgs(6, 32)))
    path = save_plan(plan, tmp_path / f"p{suffix}", {"summary": plan_stats(plan, prof.modules)})
    back = load_plan(path)
    assert all(back.args_for(r.name) == plan.args_for(r.name) for r in prof.modules)
    (tmp_path / "hand.yaml").write_text("default: {num_bits: 3, group_size: 32}\nrules:\n"
                                        "  - ['.*self_attn.*', 8]\noverrides: {a.b: {num_bits: 4, symmetric: false}}\n")
    (tmp_path / "fr.yaml").write_text("default: {num_bits: 2, group_size: 32, full_range: true}\nrules:\n"
                                      "  - ['.*self_attn.*', 4]\n")
    fr = load_plan(tmp_path / "fr.yaml")
    assert fr.args_for("x.self_attn.q_proj") == QuantArgs(4, 32, full_range=True)
    assert load_plan(save_plan(fr, tmp_path / "fr2.json")).args_for("y") == QuantArgs(2, 32, full_range=True)
    hand = load_plan(tmp_path / "hand.yaml")
    assert hand.args_for("x.self_attn.q_proj") == QuantArgs(8, 32) and hand.args_for("z") == QuantArgs(3, 32)
    assert hand.args_for("a.b") == QuantArgs(4, 32, False)
    (tmp_path / "bad.yaml").write_text("default: {num_bits: 9}\n")
    with pytest.raises(ValueError, match="2..8"):
        load_plan(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match=".yaml"):
        save_plan(plan, tmp_path / "p.txt")


@pytest.mark.parametrize("arch, method", [("qwen2_moe", "gptq"), ("mixtral", "rtn")])
def test_mixed_plan_export_reloads_like_uniform(arch, method, tiny_ckpt, tmp_path):
    d = tiny_ckpt(arch)
    mods = inventory(ModelAdapter.for_model(tiny_model(arch)))
    # every non-expert linear gets its own width/grid; routed experts share one scheme, because transformers
    # decompresses all routed experts of a fused-expert model with a single scheme (see plan_stats)
    others = [r for r in mods if r.role != "expert"]
    schemes = [QuantArgs(b, g) for b in (2, 3, 4, 8) for g in (32, -1)]
    overrides = {r.name: schemes[k % len(schemes)] for k, r in enumerate(others)}
    overrides.update({r.name: QuantArgs(3, 32) for r in mods if r.role == "expert"})
    overrides[next(r.name for r in mods if r.proj == "o_proj")] = None  # one linear stays in full precision
    plan = BitPlan(default=QuantArgs(4, 32), overrides=overrides)
    cfg = QuantConfig(method=method, plan=plan, calib=CalibSpec("wikitext2", nsamples=4, seqlen=64))
    rep, m = quantize(str(d), cfg, tmp_path / "o", skip_eval=True, return_model=True)
    with torch.no_grad():
        ours = m(input_ids=IDS).logits
    torch.testing.assert_close(reload_logits(tmp_path / "o"), ours, rtol=1e-4, atol=1e-4)
    assert {r["bits"] for r in rep["modules"]} == {2, 3, 4, 8}
    assert rep["avg_bits"] == pytest.approx(plan_stats(plan, mods)["avg_bits"])
    assert rep["quant_label"].startswith("mixed(")
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    stored = storage_schemes(mods, plan.resolve([r.name for r in mods]), fused_experts=True)
    assert len(qc["config_groups"]) == len(set(stored.values()))  # q/k/v (fused) stored with one scheme each
    assert plan_stats(plan, mods)["expert_schemes"] == 1
    # per-expert mixes still quantize (fake-quant evaluation) but are flagged for export and serving
    overrides[next(r.name for r in mods if r.role == "expert")] = QuantArgs(8, 32)
    assert plan_stats(BitPlan(default=QuantArgs(4, 32), overrides=overrides), mods)["expert_schemes"] == 2


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_full_range_profile_gives_full_range_plans(tiny_ckpt, tmp_path, capsys):
    """`moeq profile --full-range` measures on full-range grids and records it; plans made from that profile
    (without repeating the flag) use them too, so quantize writes what was measured."""
    d = tiny_ckpt("qwen2_moe")
    code, _, err = run(capsys, "profile", d, "--out", tmp_path / "prof", "--method", "rtn", "--group-size", "32",
                       "--nsamples", "4", "--seqlen", "32", "--no-predictor", "--no-block-gain", "--full-range")
    assert code == 0, err
    assert Profile.load(tmp_path / "prof").full_range
    code, _, err = run(capsys, "plan", "--profile", tmp_path / "prof", "--out", tmp_path / "p.yaml", "--avg-bits", "3")
    assert code == 0, err
    plan = load_plan(tmp_path / "p.yaml")
    assert plan.default.full_range and all(a is None or a.full_range for a in plan.overrides.values())


def test_cli_profile_plan_quantize(tiny_ckpt, tmp_path, capsys):
    d = tiny_ckpt("qwen2_moe")
    flags = ["--method", "rtn", "--group-size", "32", "--nsamples", "4", "--seqlen", "32"]
    code, out, err = run(capsys, "profile", d, "--out", tmp_path / "prof", *flags, "--predictor-epochs", "3",
                         "--predictor-hidden", "16")
    assert code == 0, err
    files = {p.name for p in (tmp_path / "prof").iterdir()}
    assert {"profile.json", "predictors.safetensors", "expert_usage.png", "outlier_scores.png",
            "block_importance.png", "sensitivity.png"} <= files
    assert set(load_predictors(tmp_path / "prof" / "predictors.safetensors")) == {0, 1}
    code, out, err = run(capsys, "plan", "--profile", tmp_path / "prof", "--out", tmp_path / "p.yaml",
                         "--avg-bits", "2.6", "--serving-compatible")
    assert code == 0, err
    assert "exact" in out and "every fused unit has one scheme" in out
    summary = __import__("yaml").safe_load((tmp_path / "p.yaml").read_text())["summary"]
    assert summary["avg_bits"] <= 2.6
    code, out, err = run(capsys, "plan", "--profile", tmp_path / "prof", "--out", tmp_path / "r.json",
                         "--attn-bits", "4", "--freq-top", "2@4", "--mix-units")  # group size 32: the profile's
    assert code == 0 and "WARNING" in out and "serving units mix schemes" in out
    assert load_plan(tmp_path / "r.json").default == QuantArgs(2, 32)
    code, out, err = run(capsys, "quantize", d, "--plan", tmp_path / "p.yaml", "--out", tmp_path / "q",
                         "--method", "rtn", "--skip-eval")
    assert code == 0, err
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    assert rep["avg_bits"] == pytest.approx(summary["avg_bits"])
    # bad input -> exit 2 naming the fix
    code, _, err = run(capsys, "plan", "--profile", tmp_path / "prof", "--out", tmp_path / "x.yaml",
                       "--avg-bits", "1.5")
    assert code == 2 and "below the lowest candidate" in err
    code, _, err = run(capsys, "plan", "--profile", tmp_path / "prof", "--out", tmp_path / "x.yaml", "--avg-bits", "3",
                       "--freq-top", "2")
    assert code == 2 and "drop the rule flags" in err
    wrong = load_plan(tmp_path / "p.yaml")  # a qwen2_moe plan naming the shared expert, applied to mixtral
    wrong.overrides["model.layers.0.mlp.shared_expert.up_proj"] = QuantArgs(4, 32)
    save_plan(wrong, tmp_path / "wrong.yaml")
    code, _, err = run(capsys, "quantize", tiny_ckpt("mixtral"), "--plan", tmp_path / "wrong.yaml", "--out",
                       tmp_path / "q2", "--method", "rtn", "--skip-eval")
    assert code == 2 and "does not have" in err


def test_engine_plans_only_use_widths_the_engine_loads(prof):
    from moeq.export.engines import ENGINES

    bits = rule_bits(prof, PlanRules(bits=3, attn_bits=2, group_size=32, engine="sglang"))
    assert {bits[r.name] for r in prof.modules} == {4}  # SGLang loads 4/8-bit only: 2 and 3 are raised
    assert rule_bits(prof, PlanRules(bits=2, attn_bits=3, group_size=32, engine="vllm"))[prof.modules[0].name] == 4
    res = search(prof, 5.0, engine="sglang")
    assert set(res.bits.values()) <= set(ENGINES["sglang"].moe_bits) and res.avg_bits <= 5.0
    assert not serving_violations(res.plan, prof.modules)
    with pytest.raises(ValueError, match="raise it|no plan fits"):
        search(prof, 3.0, engine="sglang")  # below the narrowest width SGLang loads
    with pytest.raises(ValueError, match="asymmetric"):
        PlanRules(bits=4, symmetric=False, engine="sglang")
