"""Architecture knowledge as data: transformers ``model_type`` -> :class:`ArchSpec`.

This is the only place in moeq that knows how a model family is laid out. Everything else
(the block loop, the solvers, export, evaluation) reads these declarations through
:class:`moeq.models.adapter.ModelAdapter` and never branches on the architecture.

A spec says where the blocks, attention linears, router, routed experts, shared experts and
their gate, dense MLP layers, final norm and lm_head are; which config attributes hold the
expert count and top-k; how the model forms the coefficient an expert's output is multiplied
by (the "combine" rule AGQ needs); the true-sequential groups of a block; and how expert keys
are spelled in the family's own Hugging Face checkpoints (so exports can be served by vLLM).

Paths are relative to one decoder block unless noted. A path that a given model does not
have (e.g. ``self_attn.q_a_proj`` on a DeepSeek-V3 config without q-LoRA) is simply skipped
when the spec is bound to a model, so one spec covers a family's config variants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Combine rules: how the coefficient c that multiplies an expert's output is formed.
#   softmax_topk        raw softmax probability of the chosen expert (Qwen1.5-MoE, DeepSeek-MoE-16B)
#   softmax_topk_renorm top-k softmax probabilities renormalised to sum to 1 (Mixtral)
#   softmax_topk_cfg    renormalised iff config.<renorm_attr> is true (Qwen3-MoE, OLMoE)
#   sigmoid_topk_cfg    sigmoid scores, group-limited top-k, optional renorm, times a scaling factor (DeepSeek-V3)
COMBINE_RULES = ("softmax_topk", "softmax_topk_renorm", "softmax_topk_cfg", "sigmoid_topk_cfg")
# Shared-expert coefficient: "sigmoid_gate" = sigmoid(shared_gate(x)) per token; "one" = no weighting.
SHARED_COMBINE_RULES = ("sigmoid_gate", "one")


@dataclass(frozen=True)
class MoESpec:
    """Where the mixture-of-experts parts of a block are and how they combine."""

    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    # "fused": transformers v5 3-D parameters gate_up_proj (E, 2I, H) and down_proj (E, H, I);
    # "modulelist": an nn.ModuleList of per-expert MLP modules (remote-code checkpoints).
    layout: str = "fused"
    proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # (gate, up, down) in moeq's view
    num_experts_attr: str = "num_local_experts"
    top_k_attr: str = "num_experts_per_tok"
    combine: str = "softmax_topk"
    renorm_attr: str | None = None
    shared_experts: str | None = None
    shared_gate: str | None = None
    shared_combine: str = "one"
    # "modulelist" layout only: the MoE-block method that takes (x (N, H), topk_idx (N, k), topk_weight (N, k))
    # and returns the combined routed output; moeq points it at the ExpertSet so routing is observed.
    dispatch: str | None = None
    # Key layout of the family's own HF checkpoints, for export: regex renames applied to
    # moeq's module names (e.g. Mixtral stores experts as block_sparse_moe.experts.N.w1).
    ckpt_renames: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ArchSpec:
    """A decoder-only model family. Block-relative paths unless noted."""

    name: str
    model_types: tuple[str, ...]
    blocks: str = "model.layers"  # model-relative
    embed: str = "model.embed_tokens"  # model-relative
    final_norm: str = "model.norm"  # model-relative
    lm_head: str = "lm_head"  # model-relative
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    # true-sequential attention groups, in execution order (linears of one group share an input)
    attn_groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
    )
    dense_mlp: str = "mlp"  # dense MLP of non-MoE blocks (and of dense models)
    mlp_proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    moe: MoESpec | None = None
    # Dataflow facts for function-preserving transforms (AWQ smoothing, QuaRot rotation):
    attn_module: str = "self_attn"  # its output is what AWQ compares for the input-norm scales
    attn_inputs: tuple[str, ...] | None = None  # linears reading input_norm; None: the first attn group
    attn_output: str = "self_attn.o_proj"  # the attention linear that writes the residual stream
    # (v, o): v's output channels are o's input channels, one per head dim (None where they are not, e.g. MLA)
    value_out: tuple[str, str] | None = ("self_attn.v_proj", "self_attn.o_proj")
    # norms inside a block that feed linears other than the residual readers: (norm, (linears...))
    inner_norms: tuple[tuple[str, tuple[str, ...]], ...] = ()
    qk_linears: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")  # outputs feed attention scores
    head_dim_attr: str = "head_dim"  # config attribute; hidden_size / num_attention_heads when unset
    notes: str = ""
    extra: dict = field(default_factory=dict)


_QWEN2_MOE = MoESpec(
    num_experts_attr="num_experts", combine="softmax_topk_cfg", renorm_attr="norm_topk_prob",
    shared_experts="mlp.shared_expert", shared_gate="mlp.shared_expert_gate", shared_combine="sigmoid_gate",
)

REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Add a spec under each of its model types (later registrations override earlier ones)."""
    for mt in spec.model_types:
        REGISTRY[mt] = spec
    return spec


register(ArchSpec(
    name="qwen2_moe", model_types=("qwen2_moe",), moe=_QWEN2_MOE,
    notes="Qwen1.5-MoE / Qwen2-MoE: 60-64 fine-grained experts, top-4, raw softmax weights, sigmoid-gated shared expert.",
))
register(ArchSpec(
    name="mixtral", model_types=("mixtral", "minimax"),
    moe=MoESpec(
        combine="softmax_topk_renorm",
        ckpt_renames=(
            (r"\.mlp\.", ".block_sparse_moe."),
            (r"\.experts\.(\d+)\.gate_proj\b", r".experts.\1.w1"),
            (r"\.experts\.(\d+)\.up_proj\b", r".experts.\1.w3"),
            (r"\.experts\.(\d+)\.down_proj\b", r".experts.\1.w2"),
        ),
    ),
    notes="Mixtral-8x7B style: 8 experts, top-2, renormalised softmax weights; HF checkpoints use block_sparse_moe.experts.N.w1/w3/w2.",
))
register(ArchSpec(
    name="qwen3_moe", model_types=("qwen3_moe",),
    moe=MoESpec(combine="softmax_topk_cfg", renorm_attr="norm_topk_prob"),
    notes="Qwen3-MoE: 128 experts, top-8, renormalised by default (norm_topk_prob), no shared expert.",
))
register(ArchSpec(
    name="olmoe", model_types=("olmoe",),
    moe=MoESpec(combine="softmax_topk_cfg", renorm_attr="norm_topk_prob"),
    notes="OLMoE: 64 experts, top-8, raw softmax weights by default.",
))
register(ArchSpec(
    name="deepseek_v3", model_types=("deepseek_v3", "kimi_k2"),
    attn_groups=(
        # MLA: with q-LoRA the first projections are q_a/kv_a, otherwise q_proj/kv_a
        ("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),
        ("self_attn.q_b_proj", "self_attn.kv_b_proj"),
        ("self_attn.o_proj",),
    ),
    value_out=None,
    inner_norms=(("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
                 ("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",))),
    qk_linears=("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                "self_attn.kv_b_proj"),
    moe=MoESpec(
        combine="sigmoid_topk_cfg", renorm_attr="norm_topk_prob",
        shared_experts="mlp.shared_experts", shared_combine="one",
    ),
    notes="DeepSeek-V3/R1: MLA attention, first_k_dense_replace dense blocks, 256 sigmoid-scored experts with "
          "group-limited top-8, routed_scaling_factor, ungated shared experts.",
))
register(ArchSpec(
    name="deepseek_moe", model_types=("deepseek",),
    moe=MoESpec(
        layout="modulelist", dispatch="moe_infer", num_experts_attr="n_routed_experts", combine="softmax_topk",
        shared_experts="mlp.shared_experts", shared_combine="one",
    ),
    notes="DeepSeek-MoE-16B remote code: per-expert nn.ModuleList, MoEGate router (not an nn.Linear), "
          "first layer dense, 2 ungated shared experts.",
))
register(ArchSpec(
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"),
    notes="Dense decoder: every attention and MLP linear is quantized.",
))


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


class UnsupportedArchitectureError(ValueError):
    """Raised for a model_type moeq has no spec for."""


def get_spec(model_type: str) -> ArchSpec:
    """The spec for ``model_type``, or a clear error listing what is supported."""
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unknown architecture model_type={model_type!r}. moeq supports: {', '.join(supported_model_types())}. "
            "To add one, register an ArchSpec in moeq/models/registry.py (paths of blocks, attention linears, "
            "router, experts, shared experts; no code needed for transformers-v5 fused experts)."
        ) from None
