"""What every solver returns: the integers and grid of one linear, plus its loss.

Solvers are pure functions ``(W, stats, args, knobs) -> QuantResult``; the caller decides whether to
write ``result.dequantize()`` back into the model. Export serialises ``q``/``scale``/``zero``/``g_idx``
as they are, so the checkpoint holds exactly the integers the solver chose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..quant.primitives import QuantArgs, dequantize


@dataclass
class QuantResult:
    q: torch.Tensor  # (out, in) int8 integers on the grid
    scale: torch.Tensor  # (out, G) fp32 (already rounded to the storage dtype)
    zero: torch.Tensor  # (out, G) fp32 holding integers (0 when symmetric)
    args: QuantArgs
    g_idx: torch.Tensor | None = None  # (in,) group of each column (act-order), None = consecutive groups
    loss: float | None = None  # tr((W - W_hat) H (W - W_hat)^T): mean squared output error per calibration row
    info: dict = field(default_factory=dict)  # solver-specific facts (damp used, fallback, ...)
    pre: torch.Tensor | None = None  # (out, in) grid position w / s + z before rounding (kept for blocktune only)

    def dequantize(self) -> torch.Tensor:
        """W_hat (out, in) in fp32."""
        return dequantize(self.q, self.scale, self.zero, self.args, self.g_idx)

    def cpu(self) -> "QuantResult":
        g = self.g_idx.cpu() if self.g_idx is not None else None
        pre = self.pre.cpu() if self.pre is not None else None
        return QuantResult(self.q.cpu(), self.scale.cpu(), self.zero.cpu(), self.args, g, self.loss, self.info, pre)

    @property
    def numel(self) -> int:
        return self.q.numel()
