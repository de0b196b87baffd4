"""What each ``--method`` adds around the one block loop: transforms before, a block stage inside,
activation quantization after. ``pipeline.quantize_loaded`` calls :func:`before_loop` and
:func:`after_loop`; nothing here branches on the architecture.

| method      | before the loop                     | block stage           | solver | calibration |
|-------------|-------------------------------------|-----------------------|--------|-------------|
| rtn / gptq  | -                                   | -                     | RTN / GPTQ | - / wikitext2 |
| moequant    | -                                   | -                     | GPTQ + AGQ | EBSS |
| awq         | -                                   | AWQ scales + clips    | RTN    | wikitext2 |
| moequant+   | -                                   | affinity-weighted AWQ | RTN    | EBSS |
| omniquant   | -                                   | LWC (learned clips)   | RTN    | wikitext2 |
| quarot-gptq | norm fusion + random Hadamard       | -                     | GPTQ   | wikitext2 |
| moequant++  | norm fusion + random Hadamard       | -                     | GPTQ + AGQ | EBSS |

With ``--act-bits`` every quantized linear's input is fake-quantized per token after the loop, and
(default) an online Hadamard runs before every down projection (its H folded into the weight first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .capture.awq_stage import AWQStage
from .capture.lwc_stage import LWCStage
from .config import QuantConfig
from .models.adapter import ModelAdapter
from .quant.act import attach_act_quant
from .transforms.artifact import Transforms
from .transforms.rotate import fold_online_hadamard, online_hadamard_targets, rotate_model


# Each method's defaults, from its paper/code (explicit CLI flags win): calibration source, affinity weighting
# (AGQ Hessians, or AWQ statistics/losses for moequant+), GPTQ/RTN MSE clip search (QuaRot's and MoEQuant's
# --w_clip), residual rotation.
PRESETS: dict[str, dict] = {
    "rtn": dict(calib="wikitext2", agq=False, mse_clip=False, rotate=False),
    "gptq": dict(calib="wikitext2", agq=False, mse_clip=False, rotate=False),
    "moequant": dict(calib="ebss", agq=True, mse_clip=True, rotate=False),
    "awq": dict(calib="wikitext2", agq=False, mse_clip=False, rotate=False),
    "moequant+": dict(calib="ebss", agq=True, mse_clip=False, rotate=False),
    "omniquant": dict(calib="wikitext2", agq=False, mse_clip=False, rotate=False),
    "quarot-gptq": dict(calib="wikitext2", agq=False, mse_clip=True, rotate=True),
    "moequant++": dict(calib="ebss", agq=True, mse_clip=True, rotate=True),
}


@dataclass
class MethodRun:
    transforms: Transforms = field(default_factory=Transforms)
    stage: object | None = None  # the block loop's per-block search
    hooks: list = field(default_factory=list)  # online Hadamard / activation quantization hooks
    notes: list[str] = field(default_factory=list)

    @property
    def needs_expert_view(self) -> bool:
        """Hooks sit on per-expert linears: the experts must not be re-fused."""
        return bool(self.hooks)


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


def before_loop(adapter: ModelAdapter, cfg: QuantConfig, storage_dtype=None) -> MethodRun:
    """Apply the method's up-front transforms (experts in the per-expert view) and build its block stage."""
    run = MethodRun()
    tr = run.transforms
    if cfg.rotate:
        r = rotate_model(adapter, cfg.rotate_seed)
        tr.rotation, tr.value_heads = r["rotation"], r["value_heads"]
        if r["untied"]:
            run.notes.append("lm_head untied from the embeddings by the rotation (tie_word_embeddings=false)")
        if r["rotation"].kind != "hadamard":
            run.notes.append(f"hidden size {r['rotation'].n} has no Hadamard construction: random orthogonal rotation")
    if cfg.act is not None and cfg.online_hadamard:
        tr.online_linears = online_hadamard_targets(adapter)
        _, run.hooks = fold_online_hadamard(adapter, tr.online_linears)
    if cfg.search == "awq":
        run.stage = AWQStage(cfg, storage_dtype, skip_next=set(tr.online_linears))
    elif cfg.search == "lwc":
        run.stage = LWCStage(cfg)
    return run


@torch.no_grad()
def after_loop(adapter: ModelAdapter, cfg: QuantConfig, run: MethodRun, quantized: list[str],
               storage_dtype: torch.dtype | None) -> None:
    """Collect the stage's results into the artefact, round transformed full-precision tensors to the
    checkpoint dtype (so the export holds exactly the in-memory model) and attach activation quantization."""
    tr = run.transforms
    if run.stage is not None:
        tr.smooth = list(getattr(run.stage, "scales", []))
        tr.clips = dict(run.stage.clips)
    if tr and storage_dtype is not None:
        for p in adapter.model.parameters():
            if p.is_floating_point() and p.dtype != storage_dtype:
                p.data = p.data.to(storage_dtype).to(p.dtype)
    if cfg.act is not None:
        run.hooks += attach_act_quant({n: adapter.module(n) for n in quantized}, cfg.act)
        run.notes.append(f"activations fake-quantized per token ({cfg.act.label()}) on the inputs of "
                         f"{len(quantized)} linears; routers and lm_head read full-precision inputs")
    blocker = export_blocker(cfg)
    if blocker:
        run.notes.append(blocker)
