"""Capturing the inputs of the first block, once, without the "Catcher raises ValueError" hack.

A forward pre-hook (``with_kwargs=True``) on block 0 stores its hidden states and keyword arguments
(attention mask, position embeddings, ...) and raises a private exception that stops the forward;
embeddings run on the compute device, everything captured is kept on CPU.
"""

from __future__ import annotations

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward early once everything it needs has been seen."""


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_first_block_inputs(model: nn.Module, first_block: nn.Module,
                               batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """For each batch of token ids (b, T): (hidden states (b, T, H) on CPU, block kwargs on CPU)."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append((hidden.detach().cpu(), _to(kw, "cpu")))
        raise StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    embed_device = model.get_input_embeddings().weight.device  # embeddings stay where the model is
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(embed_device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> torch.Tensor | None:
    """Run one block on (b, T, H) hidden states; -> (b, T, H) on the compute device (None if a hook
    stopped the forward early)."""
    try:
        out = block(hidden.to(device), **_to(kwargs, device))
    except StopForward:
        return None
    return out[0] if isinstance(out, tuple) else out
