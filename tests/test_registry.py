"""The architecture registry and the per-expert view, on tiny random configs of every family."""

import pytest
import torch

from conftest import ARCHS, tiny_deepseek_moe, tiny_model
from moeq.models.adapter import ModelAdapter, routing_weights
from moeq.models.moe import ExpertSet
from moeq.models.registry import UnsupportedArchitectureError, get_spec, supported_model_types

IDS = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_unfused_outputs_match_fused(arch):
    m = tiny_model(arch)
    ref = _logits(m)
    ad = ModelAdapter.for_model(m).unfuse()
    assert ad.is_unfused
    torch.testing.assert_close(_logits(m), ref, rtol=1e-5, atol=1e-5)
    ad.refuse()
    assert not any(isinstance(x, ExpertSet) for x in m.modules())
    torch.testing.assert_close(_logits(m), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_expert_of_every_layer_is_enumerated(arch):
    m = tiny_model(arch)
    ad = ModelAdapter.for_model(m).unfuse()
    names = [li.name for li in ad.linears()]
    assert len(names) == len(set(names))
    for i in ad.moe_blocks():
        for e in range(ad.num_experts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{i}.mlp.experts.{e}.{p}" in names
    # every nn.Linear except routers / shared gates / lm_head is quantizable
    fp = set(ad.full_precision_modules())
    linears = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert linears - fp == set(names)
    # groups cover exactly the block's linears, attention first, down projections last
    for i in range(ad.num_blocks):
        flat = [f"model.layers.{i}.{n}" for g in ad.groups(i) for n in g]
        assert sorted(flat) == sorted(li.name for li in ad.block_linears(i))
        assert all(n.endswith("down_proj") for n in ad.groups(i)[-1])
    if get_spec(m.config.model_type).moe is not None:
        assert ad.moe_blocks(), "an MoE architecture must have MoE blocks"


def test_deepseek_v3_has_dense_first_block_and_shared_experts():
    ad = ModelAdapter.for_model(tiny_model("deepseek_v3")).unfuse()
    assert ad.moe_blocks() == [1, 2]
    roles = {li.role for li in ad.block_linears(0)}
    assert roles == {"attn", "dense_mlp"}
    assert {li.role for li in ad.block_linears(1)} == {"attn", "expert", "shared"}
    assert [len(g) for g in ad.groups(1)][:3] == [2, 2, 1]  # MLA: (q_a, kv_a) -> (q_b, kv_b) -> o


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe"])
def test_combine_rule_matches_the_models_own_routing(arch):
    """The registry's combine rule reproduces the coefficients the model multiplies expert outputs by."""
    m = tiny_model(arch)
    ad = ModelAdapter.for_model(m).unfuse()
    i = ad.moe_blocks()[0]
    seen = {}
    es = ad.experts(i)
    h = es.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0], idx=args[1], w=args[2]))
    router_in = {}
    h2 = ad.router(i).register_forward_pre_hook(lambda mod, args: router_in.update(x=args[0]))
    _logits(m)
    h.remove(), h2.remove()
    router = ad.router(i)
    x = router_in["x"].reshape(-1, router.weight.shape[1])
    idx, w = routing_weights(x.float() @ router.weight.float().T, ad, router)
    # compare as (expert -> weight) maps per token: top-k order may differ
    dense = lambda i_, w_: torch.zeros(i_.shape[0], ad.num_experts).scatter(1, i_, w_.float())
    torch.testing.assert_close(dense(idx, w), dense(seen["idx"], seen["w"]), rtol=1e-5, atol=1e-6)


def test_modulelist_layout_remote_code_style():
    m = tiny_deepseek_moe()
    ref = _logits(m)
    ad = ModelAdapter.for_model(m).unfuse()
    assert ad.moe_blocks() == [1, 2] and ad.num_experts == 6
    torch.testing.assert_close(_logits(m), ref, rtol=1e-5, atol=1e-5)
    names = {li.name for li in ad.linears()}
    assert all(f"model.layers.2.mlp.experts.{e}.down_proj" in names for e in range(6))
    assert "model.layers.1.mlp.shared_experts.gate_proj" in names
    assert "model.layers.0.mlp.gate_proj" in names  # the dense first layer


def test_unknown_architecture_lists_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as e:
        get_spec("gpt_bigcode")
    msg = str(e.value)
    assert "gpt_bigcode" in msg
    for mt in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe"):
        assert mt in msg
    assert set(supported_model_types()) >= {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "llama"}
