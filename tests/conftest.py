"""Shared fixtures: tiny random-init models of every registry architecture (2-3 layers, 4-8 experts,
hidden 64), a DeepSeek-MoE-style remote-code block (per-expert nn.ModuleList), and checkpoints of
them saved with the bundled tokenizer so the whole CLI can run on them in seconds."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as T
from torch import nn

os.environ.setdefault("MOEQ_QUIET", "1")
# EBSS sets and FP figures are cached; a test session gets a cache of its own (hermetic, nothing in ~/.cache)
os.environ.setdefault("MOEQ_CACHE", __import__("tempfile").mkdtemp(prefix="moeq-test-cache-"))
torch.set_num_threads(min(2, torch.get_num_threads()))

from moeq.models.bundled import DEFAULT_MODEL, bundled_path  # noqa: E402

VOCAB = 8192  # the bundled byte-level BPE tokenizer's size


def tiny_config(arch: str, vocab: int = VOCAB):
    common = dict(vocab_size=vocab, hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    if arch == "mixtral":
        return T.MixtralConfig(intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2,
                               num_local_experts=4, num_experts_per_tok=2, **common)
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                num_hidden_layers=2, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                qkv_bias=True, **common)
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                                num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, head_dim=16,
                                norm_topk_prob=True, **common)
    if arch == "deepseek_v3":
        return T.DeepseekV3Config(intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                                  num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                                  n_shared_experts=2, first_k_dense_replace=1, n_group=2, topk_group=1,
                                  q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                                  v_head_dim=16, routed_scaling_factor=2.5, **common)
    if arch == "olmoe":
        return T.OlmoeConfig(intermediate_size=32, num_hidden_layers=2, num_key_value_heads=4, num_experts=4,
                             num_experts_per_tok=2, **common)
    if arch == "llama":
        return T.LlamaConfig(intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, **common)
    raise KeyError(arch)


ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "llama"]


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random-init weights with a spread that makes routing and quantization non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
            elif "norm" in name or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(0.01 * torch.randn(mod.e_score_correction_bias.shape, generator=g))
    return model


def tiny_model(arch: str, seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    m = T.AutoModelForCausalLM.from_config(tiny_config(arch, vocab), dtype=torch.float32)
    return _randomize(m, seed).eval()


# --------------------------------------------------------------------------- remote-code style MoE
class DeepseekMoEGate(nn.Module):
    """DeepSeek-MoE-16B's MoEGate: a bare weight, softmax top-k without renormalisation."""

    def __init__(self, hidden, n_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.randn(n_experts, hidden) * 0.2)

    def forward(self, x):  # (b, T, H) -> idx (N, k), weight (N, k), aux
        scores = torch.softmax(x.reshape(-1, x.shape[-1]) @ self.weight.T, dim=-1)
        w, idx = torch.topk(scores, self.top_k, dim=-1)
        return idx, w, None


class DeepseekMLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DeepseekMoE(nn.Module):
    """Same shape as the remote-code DeepseekMoE: ModuleList experts, argsort dispatch in moe_infer."""

    def __init__(self, hidden, inter, n_experts, top_k, n_shared):
        super().__init__()
        self.num_experts_per_tok = top_k
        self.experts = nn.ModuleList([DeepseekMLP(hidden, inter) for _ in range(n_experts)])
        self.gate = DeepseekMoEGate(hidden, n_experts, top_k)
        self.shared_experts = DeepseekMLP(hidden, inter * n_shared)

    def forward(self, hidden_states):
        identity, shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        y = self.moe_infer(hidden_states.view(-1, shape[-1]), topk_idx, topk_weight).view(*shape)
        return y + self.shared_experts(identity)

    @torch.no_grad()
    def moe_infer(self, x, topk_ids, topk_weight):
        cnts = torch.zeros(topk_ids.shape[0], len(self.experts), dtype=torch.long)
        cnts.scatter_(1, topk_ids, 1)
        tokens_per_expert = cnts.sum(dim=0)
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // topk_ids.shape[1]]
        outputs, start = [], 0
        for i, n in enumerate(tokens_per_expert.tolist()):
            if n:
                outputs.append(self.experts[i](sorted_tokens[start:start + n]))
            start += n
        outs = torch.cat(outputs, dim=0) if outputs else sorted_tokens.new_empty(0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        return (new_x.view(*topk_ids.shape, -1).type(topk_weight.dtype)
                .mul_(topk_weight.unsqueeze(dim=-1)).sum(dim=1).type(new_x.dtype))


def tiny_deepseek_moe(seed: int = 0):
    """A Llama body whose MLPs (after layer 0, which stays dense) are DeepSeek-MoE-16B style blocks."""
    torch.manual_seed(seed)
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 3
    m = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for layer in m.model.layers[1:]:
        layer.mlp = DeepseekMoE(64, 32, n_experts=6, top_k=2, n_shared=2)
    m.config.model_type = "deepseek"
    m.config.n_routed_experts = 6
    m.config.num_experts_per_tok = 2
    return _randomize(m, seed).eval()


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def bundled_dir():
    p = bundled_path(DEFAULT_MODEL)
    if p is None:
        pytest.fail("the bundled default model is missing from moeq/bundled")
    return p


@pytest.fixture(scope="session")
def tokenizer(bundled_dir):
    return T.AutoTokenizer.from_pretrained(bundled_dir)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tokenizer):
    """Factory: save a tiny random model of ``arch`` (bf16 on disk, like real checkpoints) with the tokenizer."""
    cache = {}

    def make(arch: str, seed: int = 0):
        key = (arch, seed)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{arch}-{seed}")
            tiny_model(arch, seed).to(torch.bfloat16).save_pretrained(d)
            tokenizer.save_pretrained(d)
            cache[key] = d
        return cache[key]
    return make
