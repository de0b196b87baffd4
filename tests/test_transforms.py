"""Function-preserving transforms: Hadamard constructions, QuaRot rotation and AWQ smoothing leave the
full-precision model's logits unchanged on every registry architecture; artefacts replay exactly."""

import pytest
import torch
import transformers as T

from conftest import ARCHS, _randomize, tiny_config, tiny_deepseek_moe, tiny_model
from moeq.models.adapter import ModelAdapter, get_submodule
from moeq.transforms.artifact import Transforms, apply_transforms
from moeq.transforms.hadamard import factor, hadamard_matrix, hadamard_transform, random_rotation
from moeq.transforms.rotate import fold_online_hadamard, online_hadamard_targets, rotate_model
from moeq.transforms.sites import inner_norm_sites, norm_sites, up_down_pairs, value_out_pair
from moeq.transforms.smooth import SmoothScale, apply_scales

IDS = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(3))
TOL = dict(rtol=0, atol=5e-6)  # float64 weights; RMSNorm and routers still compute in fp32 inside transformers


def _f64(model):
    """Per-expert view (the fused grouped_mm has no float64 kernel) in float64."""
    ad = ModelAdapter.for_model(model.to(torch.float64)).unfuse()
    return ad


def _logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


def _models():
    return [(a, lambda a=a: tiny_model(a)) for a in ARCHS] + [("deepseek_moe", tiny_deepseek_moe)]


@pytest.mark.parametrize("n", [2, 12, 20, 24, 28, 36, 40, 44, 48, 96, 1408])
def test_hadamard_orders_are_orthonormal_pm1(n):
    H = hadamard_matrix(n)  # (n, n)
    torch.testing.assert_close(H @ H.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(H.abs(), torch.full_like(H, n ** -0.5))
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), x @ H, rtol=0, atol=1e-12)


def test_orders_without_a_hadamard_fall_back_to_random_orthogonal():
    assert factor(50) is None and factor(6) is None
    r = random_rotation(50, seed=1)
    Q = r.matrix()
    assert r.kind == "random-orthogonal"
    torch.testing.assert_close(Q @ Q.T, torch.eye(50, dtype=torch.float64), rtol=0, atol=1e-12)
    s = random_rotation(64, seed=1)
    assert s.kind == "hadamard" and set(s.signs.tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("name,make", _models(), ids=[a for a, _ in _models()])
def test_rotation_preserves_logits(name, make):
    m = make()
    ad = _f64(m)
    ref = _logits(m)
    info = rotate_model(ad, seed=0)
    fold_online_hadamard(ad, online_hadamard_targets(ad))  # W4A4's online Hadamard before every down_proj
    torch.testing.assert_close(_logits(m), ref, **TOL)
    # the stream really is rotated: no norm weight is left unfused, embeddings changed
    assert torch.all(get_submodule(m, ad.spec.final_norm).weight == 1)
    assert info["rotation"].kind == "hadamard"


def test_rotation_unties_embeddings_and_handles_non_power_of_two_widths():
    cfg = tiny_config("mixtral")
    cfg.hidden_size, cfg.intermediate_size, cfg.tie_word_embeddings = 96, 50, True  # 96 = 12 * 8; 50: no Hadamard
    m = _randomize(T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), 0).eval()
    m.tie_weights()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    ad = _f64(m)
    ref = _logits(m)
    info = rotate_model(ad, seed=2)
    rots, _ = fold_online_hadamard(ad, online_hadamard_targets(ad))
    torch.testing.assert_close(_logits(m), ref, **TOL)
    assert info["untied"] and m.config.tie_word_embeddings is False
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert info["rotation"].n == 96 and info["rotation"].kind == "hadamard"
    assert rots[50].kind == "random-orthogonal"


def _random_scales(ad, g) -> list[SmoothScale]:
    """A positive random scale at every AWQ site of every block (norm sites include the full-precision readers)."""
    out = []
    for i in range(ad.num_blocks):
        block = ad.blocks[i]
        sites = [(s.norm, s.quantized + s.full_precision) for s in norm_sites(ad, i) + inner_norm_sites(ad, i)]
        pairs = up_down_pairs(ad, i) + ([value_out_pair(ad, i)] if value_out_pair(ad, i) else [])
        sites += [(p.prev, (p.next,)) for p in pairs]
        for prev, cons in sites:
            d = get_submodule(block, cons[0]).weight.shape[1]
            out.append(SmoothScale(i, prev, cons, torch.rand(d, generator=g, dtype=torch.float64) * 4 + 0.25))
    return out


@pytest.mark.parametrize("name,make", _models(), ids=[a for a, _ in _models()])
def test_awq_smoothing_preserves_logits_and_routing(name, make):
    m = make()
    ad = _f64(m)
    ref = _logits(m)
    scales = _random_scales(ad, torch.Generator().manual_seed(0))
    assert len({s.prev for s in scales}) >= 3
    apply_scales(ad.blocks, scales)
    torch.testing.assert_close(_logits(m), ref, **TOL)


def test_transforms_artefact_replays_exactly(tmp_path):
    m1, m2 = tiny_model("qwen2_moe", seed=4), tiny_model("qwen2_moe", seed=4)
    a1, a2 = ModelAdapter.for_model(m1).unfuse(), ModelAdapter.for_model(m2).unfuse()
    r = rotate_model(a1, seed=7)
    names = online_hadamard_targets(a1)
    fold_online_hadamard(a1, names)
    scales = _random_scales(a1, torch.Generator().manual_seed(1))
    apply_scales(a1.blocks, scales)
    tr = Transforms(r["rotation"], r["value_heads"], names, scales,
                    {"model.layers.0.self_attn.o_proj": (torch.rand(64, 2), torch.rand(64, 2))})
    tr.save(tmp_path / "t.safetensors")
    back = Transforms.load(tmp_path / "t.safetensors")
    assert len(back.smooth) == len(scales) and back.clips.keys() == tr.clips.keys()
    apply_transforms(a2, back)
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    torch.testing.assert_close(_logits(m2), _logits(m1), rtol=0, atol=0)
