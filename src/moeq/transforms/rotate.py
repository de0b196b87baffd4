"""QuaRot-style rotation of the residual stream, one small function per site, driven by the registry.

With h the residual stream (row vectors) and Q orthogonal, every block computes the same function
on h' = h Q once the weights are rewritten as below (W is (out, in), all maths in float64):

| site                                   | rewrite                         | cancels                          |
|----------------------------------------|---------------------------------|----------------------------------|
| norm weight w in front of readers      | W <- W diag(w), w <- 1          | RMSNorm commutes with Q only     |
|                                        |                                 | without its weight               |
| embeddings E (V, d)                    | E <- E Q                        | starts the rotated stream        |
| readers: q/k/v (MLA: q_a/kv_a), router,| W <- W Q                        | (h Q)(W Q)^T = h W^T             |
| shared gate, every expert's and shared |                                 |                                  |
| expert's gate/up, dense gate/up, head  |                                 |                                  |
| writers: o_proj, every down projection | W <- Q^T W, b <- b Q            | their output joins h Q           |
| v -> o per head (optional)             | v rows, o columns by H_hd       | attention mixes tokens, not dims |
| online Hadamard before a down_proj     | W <- W H and x <- x H at run    | (x H)(W H)^T = x W^T             |

RMSNorm(h Q) = RMSNorm(h) Q because ||h Q|| = ||h||, which is why norm weights are fused first.
Tied embeddings cannot stay tied (E Q != W_head diag(w) Q): the head is untied and the config says so.
Only the online Hadamard needs code at run time (a forward pre-hook); everything else is offline.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapter import ModelAdapter, get_submodule
from .hadamard import Rotation, random_rotation
from .sites import NormSite, head_dim, norm_sites, residual_writers, up_down_pairs, value_out_pair


def _set(t: torch.Tensor, new: torch.Tensor) -> None:
    t.data = new.to(dtype=t.dtype, device=t.device)


def fuse_norm(block: nn.Module, site: NormSite) -> None:
    """Move the norm's weight into every module that reads it: W <- W diag(w); w <- 1."""
    norm = get_submodule(block, site.norm)
    w = norm.weight.data.to(torch.float64)  # (d,)
    for p in site.quantized + site.full_precision:
        W = get_submodule(block, p).weight
        _set(W, W.data.to(torch.float64) * w[None, :])  # (out, d)
    _set(norm.weight, torch.ones_like(w))


def rotate_inputs(mods: list[nn.Module], rot: Rotation) -> None:
    """Readers of the rotated stream: W (out, d) <- W Q."""
    for m in mods:
        _set(m.weight, rot.apply(m.weight.data.to(torch.float64)))


def rotate_outputs(lins: list[nn.Linear], rot: Rotation) -> None:
    """Writers into the rotated stream: W (d, in) <- Q^T W = (W^T Q)^T; bias (d,) <- b Q."""
    for lin in lins:
        _set(lin.weight, rot.apply(lin.weight.data.to(torch.float64).T).T)
        if getattr(lin, "bias", None) is not None:
            _set(lin.bias, rot.apply(lin.bias.data.to(torch.float64)))


def rotate_embedding(emb: nn.Embedding, rot: Rotation) -> None:
    _set(emb.weight, rot.apply(emb.weight.data.to(torch.float64)))  # (V, d) <- E Q


def untie_lm_head(adapter: ModelAdapter) -> bool:
    """Give the head its own weight when it shares the embeddings'; -> whether the model was tied (in its
    config, or by sharing one tensor). A streamed model holds the head as its own tensor already."""
    model, spec = adapter.model, adapter.spec
    head, emb = get_submodule(model, spec.lm_head), get_submodule(model, spec.embed)
    shared = head.weight is emb.weight or (not head.weight.is_meta and head.weight.data_ptr() == emb.weight.data_ptr())
    if shared:
        head.weight = nn.Parameter(emb.weight.data.clone(), requires_grad=emb.weight.requires_grad)
    tied = shared or bool(getattr(model.config, "tie_word_embeddings", False))
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config and hasattr(text, "tie_word_embeddings"):
        text.tie_word_embeddings = False
    return tied


def rotate_value_heads(block: nn.Module, v_path: str, o_path: str, rot_hd: Rotation) -> None:
    """Per-head rotation of v's outputs and o's inputs by the same H_hd (exact: attention outputs are
    convex combinations of v rows per head, so the per-head rotation passes straight through)."""
    v, o = get_submodule(block, v_path), get_submodule(block, o_path)
    hd = rot_hd.n
    Wv = v.weight.data.to(torch.float64).view(-1, hd, v.in_features)  # (heads, hd, in)
    _set(v.weight, rot_hd.apply(Wv.transpose(1, 2)).transpose(1, 2).reshape(v.weight.shape))  # H^T W_v[h]
    if v.bias is not None:
        _set(v.bias, rot_hd.apply(v.bias.data.to(torch.float64).view(-1, hd)).reshape(-1))
    Wo = o.weight.data.to(torch.float64).view(o.out_features, -1, hd)  # (out, heads, hd)
    _set(o.weight, rot_hd.apply(Wo).reshape(o.weight.shape))  # W_o[:, h] H


def draw_rotation(adapter: ModelAdapter, seed: int = 0, value_heads: bool = True) -> tuple[Rotation, Rotation | None]:
    """The random Hadamard Q of the residual stream (d = hidden size) and, optionally, the per-head H_hd."""
    rot = random_rotation(adapter.config.hidden_size, seed)
    rot_hd = random_rotation(head_dim(adapter), seed + 1, random_signs=False) if value_heads else None
    return rot, rot_hd


@torch.no_grad()
def rotate_embeddings(adapter: ModelAdapter, rot: Rotation) -> bool:
    """Untie the head (it keeps the unrotated matrix, fused and rotated by :func:`rotate_head`) and rotate
    the embeddings E <- E Q; -> whether the head was tied."""
    untied = untie_lm_head(adapter)
    rotate_embedding(get_submodule(adapter.model, adapter.spec.embed), rot)
    return untied


@torch.no_grad()
def rotate_block(adapter: ModelAdapter, i: int, rot: Rotation, rot_hd: Rotation | None = None) -> None:
    """Fuse block i's norms into their readers, rotate readers and writers (and v/o per head)."""
    block = adapter.blocks[i]
    for site in norm_sites(adapter, i):
        fuse_norm(block, site)
        rotate_inputs([get_submodule(block, p) for p in site.quantized + site.full_precision], rot)
    rotate_outputs([get_submodule(block, p) for p in residual_writers(adapter, i)], rot)
    pair = value_out_pair(adapter, i)
    if rot_hd is not None and pair is not None:
        rotate_value_heads(block, pair.prev, pair.next, rot_hd)


@torch.no_grad()
def rotate_head(adapter: ModelAdapter, rot: Rotation) -> None:
    """Fuse the final norm into lm_head and rotate its input."""
    spec = adapter.spec
    fuse_norm(adapter.model, NormSite(spec.final_norm, (spec.lm_head,)))
    rotate_inputs([get_submodule(adapter.model, spec.lm_head)], rot)


def rotate_model(adapter: ModelAdapter, seed: int = 0, value_heads: bool = True) -> dict:
    """Draw and apply a rotation to a whole in-memory model: {"rotation", "value_heads", "untied"}."""
    rot, rot_hd = draw_rotation(adapter, seed, value_heads)
    return {"rotation": rot, "value_heads": rot_hd, "untied": apply_rotation(adapter, rot, rot_hd)}


def apply_rotation(adapter: ModelAdapter, rot: Rotation, rot_hd: Rotation | None = None) -> bool:
    """Rotate a whole in-memory model (per-expert view); -> whether the head was untied. The block loop
    applies the same three parts as it reaches them."""
    untied = rotate_embeddings(adapter, rot)
    for i in range(adapter.num_blocks):
        rotate_block(adapter, i, rot, rot_hd)
    rotate_head(adapter, rot)
    return untied


# ---------------------------------------------------------------------------------------------- online
def online_hadamard_targets(adapter: ModelAdapter, blocks=None) -> list[str]:
    """Full names of every down projection (routed experts, shared experts, dense MLPs) of ``blocks`` (all)."""
    blocks = range(adapter.num_blocks) if blocks is None else blocks
    return [f"{adapter.block_name(i)}.{p.next}" for i in blocks for p in up_down_pairs(adapter, i)]


class OnlineHadamard:
    """Forward pre-hook x -> x H (in x's dtype) in front of a linear whose weight holds W H."""

    def __init__(self, rot: Rotation):
        self.rot = rot

    def __call__(self, mod, args):
        x = args[0]
        return (self.rot.apply(x, dtype=x.dtype),) + tuple(args[1:])


@torch.no_grad()
def fold_online_hadamard(adapter: ModelAdapter, names: list[str]) -> tuple[dict[int, Rotation], list]:
    """W <- W H for each named linear and a pre-hook x <- x H at run time (plain Hadamard of the input
    width, no random signs). -> ({width: Rotation}, hook handles)."""
    rots: dict[int, Rotation] = {}
    handles = []
    for name in names:
        lin = adapter.module(name)
        n = lin.in_features
        rot = rots.setdefault(n, random_rotation(n, seed=n, random_signs=False))
        _set(lin.weight, rot.apply(lin.weight.data.to(torch.float64)))  # (out, n) W H
        handles.append(lin.register_forward_pre_hook(OnlineHadamard(rot)))
    return rots, handles

