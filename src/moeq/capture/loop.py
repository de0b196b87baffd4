"""The one block loop. Every method, the profile pass and streamed evaluation run through it.

    for each decoder block i:
        block = source.load_block(i)          materialize: on the compute device, per-expert view
        out = process(BlockContext)           the method's stages: transforms, searches, statistics, solves
        acts = acts.propagate(block)          its (quantized) outputs become block i+1's inputs
        done(i, ctx, out, acts)               write its results, checkpoint the run
        source.release_block(i, keep)         free it (or keep it in CPU memory)

Stages never loop over blocks or batches themselves: they register hooks and call
:meth:`BlockContext.forward`, which runs every calibration batch through the current block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..models.adapter import ModelAdapter
from ..utils.memory import release_host_memory
from ..utils.progress import progress
from .activations import Activations
from .hooks import block_output


@dataclass
class BlockContext:
    """What a stage gets for block i: the block (on the compute device) and its calibration inputs."""

    i: int
    block: nn.Module
    adapter: ModelAdapter
    acts: Activations | None  # None for data-free runs
    device: str
    outputs_seen: list | None = None  # the block's outputs of the last forward with collect=True


    @property
    def name(self) -> str:
        return self.adapter.block_name(self.i)

    def rel(self, full: str) -> str:
        """Block-relative path of a full module name."""
        return full[len(self.name) + 1:]

    def forward(self, before_batch: Callable[[], None] | None = None,
                on_output: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                collect: bool = False) -> None:
        """Run every calibration batch through the block (hooks registered by the caller observe it).
        ``on_output(k, hidden_in, out)`` gets batch k's input and output (b, T, H) on the device. With
        ``collect`` (a stage that leaves the block unchanged) the outputs are kept and the loop propagates
        them instead of running the block again."""
        self.outputs_seen = [] if collect else None
        for k, (hidden, kw) in enumerate(self.acts):
            if before_batch is not None:
                before_batch()
            y = block_output(self.block, hidden, kw, self.device)  # (b, T, H) or None if a hook stopped it
            if on_output is not None:
                on_output(k, hidden, y)
            if collect:
                self.outputs_seen.append(y)

    def outputs(self) -> list[torch.Tensor]:
        """The block's current outputs for every batch, on the device (b, T, H) each."""
        return [block_output(self.block, h, kw, self.device) for h, kw in self.acts]


@dataclass
class SearchResult:
    """What a block search stage (AWQ, LWC) found: function-preserving scales it already applied to the
    block, clip factors for the solve stage, routed rows per expert linear."""

    scales: list = field(default_factory=list)  # moeq.transforms.smooth.SmoothScale
    clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (lo, hi) (out, G)
    tokens: dict[str, int] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def run_blocks(source, acts: Activations | None, process: Callable[[BlockContext], object] | None = None, *,
               start: int = 0, keep: bool = False, through_last: bool = False,
               done: Callable[[int, BlockContext, object, Activations | None], None] | None = None,
               desc: str = "blocks") -> Activations | None:
    """The loop (module docstring). ``through_last``: also propagate the last block's outputs (evaluation
    needs them; quantization does not). Returns the activations after the last propagated block."""
    n = source.num_blocks
    for i in progress(range(start, n), desc=desc, unit="block", leave=True, total=n, initial=start):
        block = source.load_block(i)
        ctx = BlockContext(i, block, source.adapter, acts, source.device)
        out = process(ctx) if process is not None else None
        if acts is not None and (through_last or i + 1 < n):
            seen = ctx.outputs_seen
            with torch.no_grad():
                acts = acts.propagate(lambda k, h, kw: seen[k] if seen is not None else
                                      block_output(block, h, kw, source.device))
        if done is not None:
            done(i, ctx, out, acts)
        source.release_block(i, keep)
        if not keep:
            release_host_memory()
    return acts
