"""A method bound to one run: what the one block loop runs on each block, and around the loop.

:class:`MethodRun` resolves the plan once ({module name: QuantArgs}) and composes the method's
stages from the registry (:mod:`moeq.methods`):

* before block 0's inputs are captured: rotate the embeddings (``rotate``);
* on every block (:meth:`MethodRun.process`): rotate it, fold the online Hadamards (W*A*), run the
  method's search (AWQ or LWC, :class:`~moeq.capture.loop.SearchResult`), then the solve stage, then
  the block tuner (``tune``: integers and scales against the FP block, :mod:`.tune_stage`);
* after the last block: rotate the head; attach activation quantization (W*A*, in memory only).

Per-block results are returned to the caller (the pipeline writes them out and checkpoints the run);
the transforms artefact collects what every block searched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import QuantConfig
from ..methods import fp_stream_needed, get_method, solver_name
from ..models.adapter import ModelAdapter
from ..quant.act import attach_act_quant
from ..solvers.registry import SolveOptions, get_solver
from ..transforms.artifact import Transforms
from ..utils.dist import Dist
from ..transforms.rotate import (draw_rotation, fold_online_hadamard, online_hadamard_targets, rotate_block,
                                 rotate_embeddings, rotate_head)
from .awq_stage import awq_block
from .loop import BlockContext, SearchResult
from .lwc_stage import lwc_block
from .fp_stream import fp_pass
from .tune_stage import tune_solved
from .solve import BlockSolved, SolveSpec, solve_block


@dataclass
class BlockOutcome:
    solved: BlockSolved
    search: SearchResult
    online: list[str] = field(default_factory=list)  # linears given an online Hadamard in this block


def export_blocker(cfg: QuantConfig) -> str | None:
    """Why a checkpoint of this configuration would not run correctly elsewhere, or None."""
    if cfg.act is None:
        return None
    if cfg.online_hadamard:
        return ("no checkpoint written: the weights hold W_down H for the online Hadamard before every down "
                "projection, which neither compressed-tensors' quantization_config nor transformers can apply at "
                "run time, so the checkpoint would compute wrong outputs; this run is a fake-quant evaluation "
                "(transforms.safetensors keeps the rotations). Use --no-online-hadamard for an exportable W*A* run")
    if cfg.act.compressed_tensors_args() is None:
        return (f"no checkpoint written: activation clip ratio {cfg.act.clip_ratio} has no compressed-tensors field; "
                "use --act-clip 1 for an exportable run")
    return None


def solve_spec(cfg: QuantConfig, plan: dict, storage_dtype, max_solve_memory: int | None = None,
               dist: Dist = Dist()) -> SolveSpec:
    """The solve stage's settings for a resolved config."""
    return SolveSpec(
        plan=plan, solver=get_solver(solver_name(cfg)),
        opts=SolveOptions(storage_dtype, bool(cfg.mse_clip), cfg.gptq.blocksize, cfg.gptq.damp, cfg.gptq.act_order,
                          positions=get_method(cfg.method).tune),
        storage_dtype=storage_dtype, agq=bool(cfg.agq), agq_gate_proj=cfg.agq_gate_proj,
        coverage_all=cfg.expert_coverage == "all", min_tokens=cfg.min_tokens, fallback=cfg.fallback,
        true_sequential=cfg.true_sequential, batched=cfg.batched_solve, max_memory=max_solve_memory, dist=dist)


class MethodRun:
    """A resolved config bound to an adapter (see the module docstring)."""

    def __init__(self, adapter: ModelAdapter, cfg: QuantConfig, storage_dtype: torch.dtype | None,
                 max_solve_memory: int | None = None, dist: Dist = Dist()):
        self.adapter, self.cfg, self.method = adapter, cfg, get_method(cfg.method)
        self.plan = cfg.plan.resolve([li.name for li in adapter.linears()])
        self.storage_dtype = storage_dtype
        self.solve = solve_spec(cfg, self.plan, storage_dtype, max_solve_memory, dist)
        self.transforms = Transforms()
        if cfg.rotate:
            self.transforms.rotation, self.transforms.value_heads = draw_rotation(adapter, cfg.rotate_seed)
        self.online = cfg.act is not None and cfg.online_hadamard
        self.hooks: list = []  # online Hadamard / activation quantization (in-memory evaluation)
        self.fp_stream = None  # GPTAQ / blocktune: the FP model's activations, next to the quantized ones
        self.notes: list[str] = []
        if self.transforms.rotation is not None and self.transforms.rotation.kind != "hadamard":
            self.notes.append(f"hidden size {self.transforms.rotation.n} has no Hadamard construction: "
                              "random orthogonal rotation")

    @property
    def searched(self) -> bool:
        return bool(self.transforms)

    # ------------------------------------------------------------------ around the loop
    def on_embeddings(self) -> None:
        """Before block 0's inputs are captured (embeddings loaded)."""
        if self.transforms.rotation is not None and rotate_embeddings(self.adapter, self.transforms.rotation):
            self.notes.append("lm_head untied from the embeddings by the rotation (tie_word_embeddings=false)")

    def on_head(self) -> None:
        """After the last block, with the final norm and lm_head loaded."""
        if self.transforms.rotation is not None:
            rotate_head(self.adapter, self.transforms.rotation)
            self.adapter.model.config.tie_word_embeddings = False

    # ------------------------------------------------------------------ each block
    def process(self, ctx: BlockContext) -> BlockOutcome:
        tr, cfg = self.transforms, self.cfg
        if tr.rotation is not None:
            rotate_block(ctx.adapter, ctx.i, tr.rotation, tr.value_heads)
        online = []
        if self.online:
            online = online_hadamard_targets(ctx.adapter, [ctx.i])
            self.hooks += fold_online_hadamard(ctx.adapter, online)[1]
            tr.online_linears += online
        search = SearchResult()
        if self.method.search == "awq":
            search = awq_block(ctx, self.plan, cfg.awq, bool(cfg.agq), self.storage_dtype, set(online))
        elif self.method.search == "lwc":
            search = lwc_block(ctx, self.plan, cfg.lwc, self.storage_dtype)
        tr.smooth += search.scales
        tr.clips.update(search.clips)
        fp, carry = None, fp_stream_needed(cfg)
        if ctx.acts is not None and (self.method.tune or carry):
            if carry and self.fp_stream is None:  # block 0 (a run that resumes is refused)
                self.fp_stream = ctx.acts.fork("fp-stream")
            fp = fp_pass(ctx, self.plan, self.fp_stream if carry else None, inputs=bool(cfg.gptaq))
            if carry:
                self.fp_stream = fp.stream
        solved = solve_block(ctx, self.solve, search.clips, search.tokens, fp.inputs if fp is not None else None)
        if fp is not None and self.method.tune:
            search.info["tune"] = tune_solved(ctx, solved, fp, cfg.tune, self.storage_dtype)
        return BlockOutcome(solved, search, online)

    def round_block(self, block: torch.nn.Module) -> None:
        """Round transformed full-precision tensors to the checkpoint dtype, so the in-memory model holds
        exactly what the export holds (only needed when a transform rewrote them)."""
        if self.searched and self.storage_dtype is not None:
            for p in block.parameters():
                if p.is_floating_point() and p.dtype != self.storage_dtype:
                    p.data = p.data.to(self.storage_dtype).to(p.dtype)

    def attach_act_quant(self, quantized: list[str]) -> None:
        """W*A*: fake-quantize every quantized linear's input (in-memory evaluation only)."""
        if self.cfg.act is None:
            return
        self.hooks += attach_act_quant({n: self.adapter.module(n) for n in quantized}, self.cfg.act)
        self.notes.append(f"activations fake-quantized per token ({self.cfg.act.label()}) on the inputs of "
                          f"{len(quantized)} linears; routers and lm_head read full-precision inputs")
