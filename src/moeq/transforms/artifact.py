"""Everything a method searched or drew, as one re-appliable artefact (``transforms.safetensors``).

llm-awq's rule, "search results are data": the residual rotation (random Hadamard signs, or a dense
orthogonal matrix), the optional per-head v/o rotation, the online Hadamards folded into down
projections, the AWQ scales (with the op they divide and the modules they multiply) and the clip
factors (AWQ clip search or OmniQuant LWC) are saved as tensors with a JSON index in the safetensors
metadata. :func:`apply_transforms` replays the function-preserving part on a fresh full-precision
model (per-expert view active); the clips are what ``rtn(..., clip=...)`` takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.adapter import ModelAdapter
from .hadamard import Rotation
from .rotate import apply_rotation, fold_online_hadamard
from .smooth import SmoothScale, apply_scales

VERSION = 1


@dataclass
class Transforms:
    rotation: Rotation | None = None  # residual stream
    value_heads: Rotation | None = None  # per-head v/o
    online_linears: list[str] = field(default_factory=list)  # linears with an online Hadamard on their input
    smooth: list[SmoothScale] = field(default_factory=list)
    clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (lo, hi) (out, G)

    def __bool__(self) -> bool:
        return bool(self.rotation is not None or self.online_linears or self.smooth or self.clips)

    def describe(self) -> dict:
        """Summary for report.json."""
        return {
            "rotation": None if self.rotation is None else {"size": self.rotation.n, "kind": self.rotation.kind},
            "value_heads": None if self.value_heads is None else {"size": self.value_heads.n,
                                                                  "kind": self.value_heads.kind},
            "online_hadamard": len(self.online_linears),
            "smooth_scales": len(self.smooth),
            "clips": len(self.clips),
            "alpha": [round(s.info["alpha"], 3) for s in self.smooth if s.info],
        }

    def save(self, path: str | Path) -> None:
        tensors, meta = {}, {"version": VERSION, "online_linears": self.online_linears, "smooth": [], "clips": []}
        for key, rot in (("rotation", self.rotation), ("value_heads", self.value_heads)):
            if rot is not None:
                tensors[f"{key}.{'signs' if rot.dense is None else 'dense'}"] = (
                    rot.signs if rot.dense is None else rot.dense).contiguous()
                meta[key] = rot.n
        for k, sc in enumerate(self.smooth):
            tensors[f"smooth.{k}"] = sc.scale.contiguous()  # as searched (exact replay)
            meta["smooth"].append({"block": sc.block, "prev": sc.prev, "consumers": list(sc.consumers),
                                   "info": sc.info})
        for name, (lo, hi) in self.clips.items():
            tensors[f"clip.{name}.lo"], tensors[f"clip.{name}.hi"] = lo.float().clone(), hi.float().clone()
            meta["clips"].append(name)
        save_file(tensors, str(path), metadata={"moeq_transforms": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "Transforms":
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["moeq_transforms"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        rots = {}
        for key in ("rotation", "value_heads"):
            if key in meta:
                rots[key] = Rotation(meta[key], signs=t.get(f"{key}.signs"), dense=t.get(f"{key}.dense"))
        smooth = [SmoothScale(e["block"], e["prev"], tuple(e["consumers"]), t[f"smooth.{k}"], e.get("info"))
                  for k, e in enumerate(meta["smooth"])]
        clips = {n: (t[f"clip.{n}.lo"], t[f"clip.{n}.hi"]) for n in meta["clips"]}
        return cls(rots.get("rotation"), rots.get("value_heads"), list(meta["online_linears"]), smooth, clips)


@torch.no_grad()
def apply_transforms(adapter: ModelAdapter, tr: Transforms) -> list:
    """Replay rotation, online Hadamards and smoothing scales on a full-precision model whose experts are
    in the per-expert view; -> online-Hadamard hook handles (the model must stay unfused while they matter)."""
    if tr.rotation is not None:
        apply_rotation(adapter, tr.rotation, tr.value_heads)
    handles = fold_online_hadamard(adapter, tr.online_linears)[1] if tr.online_linears else []
    apply_scales(adapter.blocks, tr.smooth)
    return handles
