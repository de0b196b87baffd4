"""Block tuning of a quantized block's integers and scales against its full-precision output, as a pure function.

The start is a solved grid per linear (GPTQ's or RTN's :class:`~moeq.solvers.base.QuantResult`:
integers q0, scales s0, zero points z). Two things are learned, SignRound-style (Cheng et al., 2023:
signed gradient descent, a fixed number of steps, the step size decaying linearly to 0):

* a rounding offset V (out, in) per weight, |V| <= ``max_offset`` (1/2): the integers are
  clamp(round(p0 + V), qmin, qmax) where p0 = w / s0 + z is the weight's grid position when its start was
  rounded (GPTQ: after the error feedback of the columns before it; ``QuantResult.pre``), so V = 0 is
  the start, and weights whose position lies near a rounding boundary are the first to flip;
* a scale factor a (out, G) per group, |a| <= ``max_scale``: the scales are s = s0 (1 + a) rounded to the
  storage dtype (not on grids whose scales are fixed by the GGUF block formats: ``superblock``, ``ggml``),
  and the positions follow: p = (p0 - z) s0 / s + z, the start's continuous weight on the new grid, so
  a scale change re-rounds the weights (SignRound's min-max tuning, for a scale).

Roundings pass gradients straight through. Zero points stay as solved. The loss is the caller's
``block_loss(W_hat, batch)`` (the block's output error, plus whatever MoE terms it adds); the steps run it
under bf16 autocast where bf16 matmuls are native (``precision``; as auto-round does: about 4x faster
matmuls on an AVX512-BF16 CPU), every measurement that chooses the result runs it in fp32. The loss on
held-out calibration batches (the last eighth, which the steps never see) is measured at the start and
every ``check_every`` steps; the state with the lowest one is returned if it also lowers the whole
calibration loss (measured once, at the end), else the start. So the result never has a higher calibration
loss than the start and stops before it overfits. The result is again an integer grid (QuantResult),
exported like any other solver's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..quant.primitives import _expand, _round_scale
from .base import QuantResult


TUNE_STARTS = ("rtn", "gptaq")
TUNE_PRECISIONS = ("auto", "bf16", "fp32")


def fast_bf16(device) -> bool:
    """Whether bf16 matmuls are native on ``device`` (a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return dev.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def step_autocast(device, precision: str):
    """The autocast context the tuning steps run in: bf16 for "bf16", or for "auto" where it is native."""
    dev = torch.device(device)
    on = precision == "bf16" or (precision == "auto" and fast_bf16(dev))
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on and dev.type in ("cpu", "cuda"))


@dataclass(frozen=True)
class TuneKnobs:
    steps: int = 200  # signed-gradient steps per block (one calibration batch each; SignRound's 200)
    lr: float = 0.01  # initial step of V, decayed linearly to 0
    scale_lr: float = 0.01  # initial step of a, decayed linearly to 0
    check_every: int = 25  # steps between measurements of the held-out loss (the best state is kept)
    max_offset: float = 0.5  # |V| bound: a weight rounds at most to the other neighbour of its position
    max_scale: float = 0.2  # |a| bound: scales within +-20% of the start
    router: float = 0.1  # weight of the router term (KL of FP to quantized routing distribution)
    expert: float = 0.1  # weight of the affinity-weighted expert-output term
    asymmetric: bool = True  # targets from the FP model's own stream (False: the FP block on the quantized stream)
    start: str = "rtn"  # the grid the tuner starts from: "rtn" (SignRound's start) or "gptaq"
    precision: str = "auto"  # the steps' matmuls: "bf16" autocast, "fp32", or "auto" (bf16 where native)

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0 or self.scale_lr < 0 or self.check_every < 1 or not 0 < self.max_offset or not 0 <= self.max_scale < 1:
            raise ValueError("--tune-steps must be >= 0, --tune-lr > 0, and the offset/scale bounds positive "
                             "(scale bound below 1)")
        if self.start not in TUNE_STARTS:
            raise ValueError(f"--tune-start must be one of {', '.join(TUNE_STARTS)}, got {self.start!r}")
        if self.precision not in TUNE_PRECISIONS:
            raise ValueError(f"--tune-precision must be one of {', '.join(TUNE_PRECISIONS)}, got {self.precision!r}")
        if self.router < 0 or self.expert < 0:
            raise ValueError("--tune-router and --tune-expert must be >= 0")


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def _scale_ste(s: torch.Tensor, scale_dtype) -> torch.Tensor:
    return (_round_scale(s.detach(), scale_dtype) - s).detach() + s


class _Param:
    """The learnable state of one linear (V, a) and how it maps to weights and a QuantResult."""

    def __init__(self, r: QuantResult, device, tune_scale: bool):
        self.r = r
        self.q0 = r.q.to(device).float()  # (out, in)
        self.p0 = r.pre.to(device).float() if r.pre is not None else self.q0  # (out, in) start position
        self.s0 = r.scale.to(device).float()  # (out, G)
        self.z = r.zero.to(device).float()  # (out, G)
        self.V = torch.zeros_like(self.q0, requires_grad=True)  # (out, in)
        self.a = torch.zeros_like(self.s0, requires_grad=True) if tune_scale else None  # (out, G)

    def tensors(self) -> list[torch.Tensor]:
        return [self.V] + ([self.a] if self.a is not None else [])

    def grid(self, scale_dtype, ste: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(integers (out, in) as floats, scales (out, G)) of the current state."""
        rnd = _round_ste if ste else torch.round
        args = self.r.args
        s, p = self.s0, self.p0  # (out, G), (out, in): the start's scales are already in the storage dtype
        if self.a is not None:  # the same continuous weights on the new grid: positions move with the scale
            s = self.s0 * (1 + self.a)  # (out, G)
            s = _scale_ste(s, scale_dtype) if ste else _round_scale(s, scale_dtype)
            n = p.shape[1]
            ratio = _expand(self.s0, args, n, self.r.g_idx) / _expand(s, args, n, self.r.g_idx)  # (out, in)
            z = _expand(self.z, args, n, self.r.g_idx)
            p = (self.p0 - z) * ratio + z
        q = torch.clamp(rnd(p + self.V), args.qmin, args.qmax)  # (out, in)
        return q, s

    def weight(self, scale_dtype) -> torch.Tensor:
        q, s = self.grid(scale_dtype, ste=True)
        n = q.shape[1]
        args, g = self.r.args, self.r.g_idx
        return (q - _expand(self.z, args, n, g)) * _expand(s, args, n, g)  # (out, in)

    def result(self, scale_dtype) -> QuantResult:
        with torch.no_grad():
            q, s = self.grid(scale_dtype, ste=False)
            moved = int((q != self.q0).sum())
        return replace(self.r, q=q.to(torch.int8).cpu(), scale=s.cpu(), zero=self.r.zero.clone(), pre=None,
                       info={**self.r.info, "tuned_moved": moved})

    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.tensors()]

    def restore(self, snap: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t, v in zip(self.tensors(), snap):
                t.copy_(v)


def tune_block(start: dict[str, QuantResult], batches: list,
               block_loss: Callable[[dict[str, torch.Tensor], object], torch.Tensor], knobs: TuneKnobs,
               device, scale_dtype: torch.dtype | None = None) -> tuple[dict[str, QuantResult], dict]:
    """Tune the grids ``start`` ({name: QuantResult}) of one block jointly.

    ``block_loss(W_hat, batch)`` returns the differentiable calibration loss of one batch with the weights
    W_hat ({name: (out, in)}) substituted. -> ({name: tuned QuantResult}, {"loss_start", "loss_end", "kept",
    "best_step", "steps", held-out figures}): the start or the state chosen as the module docstring says."""
    params = {n: _Param(r, device, tune_scale=not (r.args.superblock or r.args.ggml)) for n, r in start.items()}

    # the last eighth of the batches (at least one, when there are 4 or more) is held out of the steps
    n_hold = len(batches) // 8 if len(batches) >= 8 else int(len(batches) >= 4)
    train, held = batches[:len(batches) - n_hold], batches[len(batches) - n_hold:] or batches

    def batch_losses(which: list) -> list[float]:
        with torch.no_grad():
            W = {n: p.weight(scale_dtype) for n, p in params.items()}
            return [float(block_loss(W, b)) for b in which]

    mean = lambda v: sum(v) / max(1, len(v))  # noqa: E731
    each = batch_losses(batches)
    loss0, hold0 = mean(each), mean(each[len(train):] or each)  # the start's whole and held-out losses
    best_hold, best_snap, best_step = hold0, None, 0
    steps = knobs.steps if batches else 0
    rates = (knobs.lr, knobs.scale_lr)
    with torch.enable_grad():
        for step in range(steps):
            decay = 1 - step / steps  # linear decay to 0
            W = {n: p.weight(scale_dtype) for n, p in params.items()}
            with step_autocast(device, knobs.precision):
                loss = block_loss(W, train[step % len(train)])
            grads = torch.autograd.grad(loss, [t for p in params.values() for t in p.tensors()], allow_unused=True)
            with torch.no_grad():
                it = iter(grads)
                for p in params.values():
                    for t, lr, bound in zip(p.tensors(), rates, (knobs.max_offset, knobs.max_scale)):
                        g = next(it)
                        if g is not None:
                            t.sub_(decay * lr * g.sign()).clamp_(-bound, bound)
            if (step + 1) % knobs.check_every == 0 or step + 1 == steps:  # held-out batches only: cheap
                now_hold = mean(batch_losses(held))
                if now_hold < best_hold:
                    best_hold, best_step = now_hold, step + 1
                    best_snap = {n: p.snapshot() for n, p in params.items()}
    best = loss0
    if best_snap is not None:  # the state with the lowest held-out loss: kept if it lowers the whole loss too
        for n, p in params.items():
            p.restore(best_snap[n])
        best = mean(batch_losses(batches))
        if best >= loss0:
            best, best_hold, best_step = loss0, hold0, 0
    if not best_step:
        for p in params.values():
            p.restore([torch.zeros_like(t) for t in p.tensors()])
    info = {"loss_start": loss0, "loss_end": best, "heldout_start": hold0, "heldout_end": best_hold,
            "heldout_batches": n_hold, "kept": "tuned" if best_step else "start", "best_step": best_step, "steps": steps}
    return {n: p.result(scale_dtype) for n, p in params.items()}, info
