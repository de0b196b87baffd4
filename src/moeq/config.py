"""Typed configuration of a quantization run. Validation only: no policy, no side effects.

A :class:`QuantConfig` is what ``moeq quantize`` builds from its flags (and what the Python API
takes). Per-module bit widths come from a :class:`BitPlan` (uniform when none is given).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .quant.primitives import QuantArgs

METHODS = ("rtn", "gptq", "moequant")  # moequant = EBSS calibration + AGQ + GPTQ
COVERAGE = ("routed", "all")
FALLBACKS = ("rtn", "avg-hessian")


@dataclass(frozen=True)
class CalibSpec:
    """Which text calibrates, and how much of it."""

    source: str = "wikitext2"  # named source, "ebss" (self-generated), or a .txt/.jsonl path
    nsamples: int = 128
    seqlen: int | None = None  # None: min(2048, model context)
    seed: int = 0
    ebss_width: int = 4  # EBSS beam width
    ebss_tau: float = 1.2  # EBSS balance temperature

    def __post_init__(self):
        if self.nsamples < 1:
            raise ValueError(f"--nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen < 2:
            raise ValueError(f"--seqlen must be >= 2, got {self.seqlen}")


@dataclass(frozen=True)
class GPTQKnobs:
    blocksize: int = 128
    damp: float = 0.01  # relative to mean(diag H); raised x10 automatically if Cholesky fails
    act_order: bool = False  # with static groups
    mse_clip: bool = False

    def __post_init__(self):
        if not 0 < self.damp < 1:
            raise ValueError(f"--damp must be in (0, 1), got {self.damp}")
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")


@dataclass
class BitPlan:
    """Module name -> QuantArgs, with a default for modules the plan does not name.

    ``rules`` are (regex, QuantArgs) tried in order on the full module name; ``overrides`` are exact
    names and win over rules. Modules mapped to ``None`` stay in full precision.
    """

    default: QuantArgs = field(default_factory=QuantArgs)
    rules: list[tuple[str, QuantArgs | None]] = field(default_factory=list)
    overrides: dict[str, QuantArgs | None] = field(default_factory=dict)

    def args_for(self, name: str) -> QuantArgs | None:
        if name in self.overrides:
            return self.overrides[name]
        for pat, a in self.rules:
            if re.fullmatch(pat, name):
                return a
        return self.default


@dataclass(frozen=True)
class QuantConfig:
    method: str = "rtn"
    plan: BitPlan = field(default_factory=BitPlan)
    calib: CalibSpec = field(default_factory=CalibSpec)
    gptq: GPTQKnobs = field(default_factory=GPTQKnobs)
    expert_coverage: str = "routed"  # "all": every token through every expert, for statistics only
    min_tokens: int = 8  # experts with fewer calibration tokens use the fallback
    fallback: str = "rtn"
    mse_clip: bool = False  # for RTN
    batch_size: int = 8  # calibration sequences per forward in the block loop
    batched_solve: bool = True  # solve equal-shaped linears (a layer's experts) in one batched GPTQ call
    agq: bool = False  # affinity-guided Hessians: each routed row weighted by its combine coefficient c
    agq_gate_proj: bool = True  # also weight the experts' gate_proj (MoEQuant Eq. 17 approximation)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.expert_coverage not in COVERAGE:
            raise ValueError(f"--expert-coverage must be one of {COVERAGE}, got {self.expert_coverage!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"--fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.min_tokens < 0:
            raise ValueError("--min-tokens must be >= 0")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"

    @property
    def solver(self) -> str:
        """The per-linear solver: RTN, or GPTQ for every calibrated method."""
        return "rtn" if self.method == "rtn" else "gptq"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plan"] = {"default": self.plan.default.to_dict(),
                     "rules": [[p, a.to_dict() if a else None] for p, a in self.plan.rules],
                     "overrides": {k: (a.to_dict() if a else None) for k, a in self.plan.overrides.items()}}
        return d
