"""What llama.cpp needs per architecture, as data: the GGUF architecture, its hyper-parameter keys, and
the few tensor rewrites its graphs assume (read from llama.cpp's src/models/*.cpp as bundled with
llama-cpp-python 0.3.36; tensor names come from gguf-py's own TensorNameMap).

* Mixtral is llama.cpp's ``llama`` architecture: interleaved-pair RoPE, so q/k rows are permuted per head.
* Qwen2-MoE's shared-expert gate is a 1-D ``{n_embd}`` tensor; qwen2moe and olmoe need ``output.weight``
  even when the embeddings are tied.
* DeepSeek-V3 (``deepseek2``) runs MLA as MQA: ``kv_b_proj`` is split per head into ``attn_k_b`` (a
  transpose of its K rows, so its blocks cannot keep moeq's integers: written as F32 values) and
  ``attn_v_b`` (rows: exact).
* llama.cpp fixes per architecture whether the top-k routing weights are renormalised; a checkpoint that
  disagrees would compute another model, so it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import gguf
import numpy as np


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rp.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"GGUF export handles the default RoPE only, this model has rope_type={rp['rope_type']!r}")
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _common(w: gguf.GGUFWriter, cfg: dict) -> None:
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts"))
    w.add_expert_used_count(cfg["num_experts_per_tok"])


def _qwen2moe(w, cfg):
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise ValueError("llama.cpp's qwen2moe/qwen3moe have no dense (mlp_only) layers; this model has some")
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])


def _llama(w, cfg):
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_rope_dimension_count(hd)
    if hd != cfg["hidden_size"] // cfg["num_attention_heads"]:
        w.add_key_length(hd)
        w.add_value_length(hd)


def _olmoe(w, cfg):
    if (cfg.get("num_key_value_heads") or cfg["num_attention_heads"]) != cfg["num_attention_heads"] or cfg.get("clip_qkv"):
        raise ValueError("llama.cpp's olmoe needs num_key_value_heads == num_attention_heads and no clip_qkv")


def _deepseek2(w, cfg):
    nope, rope, vhd, kvr = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    w.add_head_count_kv(1)  # MLA as MQA: one latent KV head (overrides the common key)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_leading_dense_block_count(cfg.get("first_k_dense_replace", 0))
    w.add_q_lora_rank(cfg.get("q_lora_rank") or 0)
    w.add_kv_lora_rank(kvr)
    w.add_rope_dimension_count(rope)
    w.add_key_length(kvr + rope)
    w.add_value_length(kvr)
    w.add_key_length_mla(nope + rope)
    w.add_value_length_mla(vhd)
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_shared_count(cfg.get("n_shared_experts") or 0)
    w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
    w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", False)))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    ng, tg = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    if ng > 1 and tg < ng:  # llama.cpp asserts topk_group < n_group when groups are written
        w.add_expert_group_count(ng)
        w.add_expert_group_used_count(tg)


@dataclass(frozen=True)
class GGUFArch:
    arch: gguf.MODEL_ARCH
    hparams: Callable  # (writer, config dict) -> None, after the common keys
    renorm_topk: bool | None  # what llama.cpp hardcodes (None: read from the file)
    output_required: bool = False  # write output.weight even for tied embeddings
    permute_qk: bool = False  # llama: HF rotate-half rows -> interleaved pairs
    mla: bool = False  # deepseek2: split kv_b_proj into k_b / v_b
    vector_shared_gate: bool = False  # the shared-expert gate (1, H) is written as a 1-D {n_embd} tensor
    renames: tuple[tuple[str, str], ...] = field(default=())  # HF-name fixes before the TensorNameMap


GGUF_ARCHS: dict[str, GGUFArch] = {  # registry spec name -> llama.cpp architecture
    "qwen2_moe": GGUFArch(gguf.MODEL_ARCH.QWEN2MOE, _qwen2moe, False, output_required=True, vector_shared_gate=True),
    "qwen3_moe": GGUFArch(gguf.MODEL_ARCH.QWEN3MOE, _qwen2moe, True),
    "mixtral": GGUFArch(gguf.MODEL_ARCH.LLAMA, _llama, True, permute_qk=True,
                        renames=((".block_sparse_moe.gate.", ".mlp.gate."),)),
    "olmoe": GGUFArch(gguf.MODEL_ARCH.OLMOE, _olmoe, False, output_required=True),
    "deepseek_v3": GGUFArch(gguf.MODEL_ARCH.DEEPSEEK2, _deepseek2, None, mla=True,
                            renames=(("e_score_correction_bias", "e_score_correction.bias"),)),
}


def gguf_arch(spec_name: str, cfg: dict) -> GGUFArch:
    """The llama.cpp architecture of a registry family, or a clear error."""
    if spec_name not in GGUF_ARCHS:
        raise ValueError(f"GGUF export supports {', '.join(sorted(GGUF_ARCHS))} (what llama.cpp runs); "
                         f"{spec_name} is not one: export compressed-tensors instead")
    a = GGUF_ARCHS[spec_name]
    if a.renorm_topk is not None:
        have = bool(cfg.get("norm_topk_prob", a.renorm_topk if a.arch == gguf.MODEL_ARCH.LLAMA else False))
        if have != a.renorm_topk:
            raise ValueError(f"llama.cpp's {gguf.MODEL_ARCH_NAMES[a.arch]} always uses norm_topk_prob={a.renorm_topk}, "
                             f"this model has {have}: llama.cpp would compute another model")
    return a


def write_hparams(w: gguf.GGUFWriter, a: GGUFArch, cfg: dict) -> None:
    _common(w, cfg)
    a.hparams(w, cfg)


def rope_permute(n_head: int):
    """Rows of q/k (HF rotate-half halves) -> interleaved pairs per head (llama.cpp's llama RoPE)."""
    def fn(x: np.ndarray) -> np.ndarray:
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
    return fn


def deinterleave_rope(n_head: int, head: int, nope: int, rope: int):
    """DeepSeek with rope_interleave=False: each head's last ``rope`` rows to interleaved pairs."""
    def fn(x: np.ndarray) -> np.ndarray:
        x = x.reshape(n_head, head, *x.shape[1:]).copy()
        r = x[:, nope:nope + rope]
        x[:, nope:nope + rope] = r.reshape(n_head, 2, rope // 2, *r.shape[2:]).swapaxes(1, 2).reshape(r.shape)
        return x.reshape(n_head * head, *x.shape[2:])
    return fn
