"""Routing and output fidelity metrics."""

import copy

import pytest
import torch

from conftest import tiny_model
from moeq.evaluate.fidelity import compare

IDS = torch.randint(1, 8192, (3, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_identical_models_agree_fully(arch):
    m = tiny_model(arch)
    r = compare(m, copy.deepcopy(m), IDS)
    assert r["mean_topk_set_agreement"] == 1.0 and r["mean_top1_agreement"] == 1.0
    assert all(v["topk_set_agreement"] == 1.0 for v in r["routing"].values())
    assert abs(r["kl_fp_to_quantized"]) < 1e-6


def test_perturbed_router_lowers_agreement():
    m = tiny_model("qwen2_moe")
    q = copy.deepcopy(m)
    with torch.no_grad():
        q.model.layers[1].mlp.gate.weight.add_(torch.randn_like(q.model.layers[1].mlp.gate.weight) * 0.5)
    r = compare(m, q, IDS)
    assert r["routing"][0]["topk_set_agreement"] == 1.0  # layer 0 untouched and upstream of the change
    assert r["routing"][1]["topk_set_agreement"] < 1.0
    assert r["routing"][1]["top1_agreement"] < 1.0
    assert r["kl_fp_to_quantized"] > 0
