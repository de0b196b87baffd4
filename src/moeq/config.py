"""Typed configuration of a quantization run. Validation only: no policy, no side effects.

A :class:`QuantConfig` is what ``moeq quantize`` builds from its flags (and what the Python API
takes). Fields left at ``None`` take the method's defaults: :func:`moeq.methods.resolve_config` fills
them from the method registry, inside the library, so the API and the CLI run exactly the same thing.
Per-module bit widths come from a :class:`BitPlan` (uniform when none is given), resolved once per run
to {module name: QuantArgs} by :meth:`BitPlan.resolve`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

from .quant.act import ActQuantArgs
from .quant.primitives import QuantArgs
from .solvers.blocktune import TuneKnobs

COVERAGE = ("routed", "all")
FALLBACKS = ("rtn", "avg-hessian")


@dataclass(frozen=True)
class CalibSpec:
    """Which text calibrates, and how much of it."""

    source: str | None = None  # named source, "ebss" (self-generated) or a text file; None: the method's default
    nsamples: int = 128
    seqlen: int | None = None  # None: min(2048, model context)
    seed: int = 0
    ebss_width: int = 4  # EBSS beam width
    ebss_tau: float = 1.2  # EBSS balance temperature
    ebss_no_repeat_ngram: int = 0  # EBSS beams never repeat an n-gram (0 = off, the paper's search)

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

    def __post_init__(self):
        if not 0 < self.damp < 1:
            raise ValueError(f"--damp must be in (0, 1), got {self.damp}")
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")


@dataclass(frozen=True)
class AWQKnobs:
    grid: int = 20  # scale exponents alpha in {0, 1/grid, ...}
    clip: bool = True  # AWQ's output-aware clip search after the scales
    clip_grid: int = 20
    clip_max_shrink: float = 0.5  # shrink factors 1, 0.95, ..., 0.55
    clip_tokens: int = 512  # sampled input rows per linear for the clip search (llm-awq's n_sample_token)


@dataclass(frozen=True)
class LWCKnobs:
    """OmniQuant learnable weight clipping; OmniQuant itself trains 20 epochs on a GPU."""

    epochs: int = 2  # passes over the calibration set per block (CPU-friendly)
    lr: float = 5e-2  # AdamW, no weight decay
    init: float = 4.0  # clip logits: sigmoid(4) = 0.982 of the min-max range

    def __post_init__(self):
        if self.epochs < 0 or self.lr <= 0:
            raise ValueError("--lwc-epochs must be >= 0 and --lwc-lr > 0")


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

    def resolve(self, names) -> dict[str, QuantArgs | None]:
        """{module name: QuantArgs or None (full precision)} for every name, resolved once per run."""
        return {n: self.args_for(n) for n in names}

    def full_range(self) -> "BitPlan":
        """``--full-range``: every symmetric scheme (not the K-quant scale grids) on all 2^b integers."""
        return self.mapped(lambda a: replace(a, full_range=True) if a.symmetric and not a.superblock else a)

    def mapped(self, fn) -> "BitPlan":
        """The same plan with every scheme a replaced by fn(a) (None stays None)."""
        f = lambda a: None if a is None else fn(a)  # noqa: E731
        return BitPlan(default=f(self.default), rules=[(p, f(a)) for p, a in self.rules],
                       overrides={n: f(a) for n, a in self.overrides.items()})

    def label(self) -> str:
        """The default grid's label (w4g128), or mixed(w2g128/w4g128/fp) when rules or overrides differ."""
        schemes = {self.default} | {a for _, a in self.rules} | set(self.overrides.values())
        if len(schemes) == 1:
            return self.default.label()
        return "mixed(" + "/".join(sorted(a.label() if a else "fp" for a in schemes)) + ")"


@dataclass(frozen=True)
class QuantConfig:
    method: str = "rtn"  # a name (or alias) of moeq.methods.METHODS
    plan: BitPlan = field(default_factory=BitPlan)
    calib: CalibSpec = field(default_factory=CalibSpec)
    gptq: GPTQKnobs = field(default_factory=GPTQKnobs)
    expert_coverage: str = "routed"  # "all": every token through every expert, for statistics only
    min_tokens: int = 8  # experts with fewer calibration tokens use the fallback
    fallback: str = "rtn"
    mse_clip: bool | None = None  # MSE-searched clip of every grid (RTN and GPTQ); None: the method's default
    batch_size: int = 8  # calibration sequences per forward in the block loop
    true_sequential: bool = True  # False: one statistics pass per block for all its linears (llm-compressor's way)
    batched_solve: bool = True  # solve equal-shaped linears (a layer's experts) in one batched GPTQ call
    gptaq: bool | None = None  # GPTQ on the FP model's outputs (asymmetric calibration); None: the method's default
    agq: bool | None = None  # affinity-guided Hessians (each routed row weighted by its combine coefficient c)
    agq_gate_proj: bool = True  # also weight the experts' gate_proj (MoEQuant Eq. 17 approximation)
    awq: AWQKnobs = field(default_factory=AWQKnobs)  # with agq, AWQ statistics and losses are affinity-weighted
    lwc: LWCKnobs = field(default_factory=LWCKnobs)
    tune: TuneKnobs = field(default_factory=TuneKnobs)  # blocktune
    rotate: bool | None = None  # QuaRot: fuse norms, rotate the residual stream by a random Hadamard
    rotate_seed: int = 0
    act: ActQuantArgs | None = None  # activation fake quantization of every quantized linear's input (W*A*)
    online_hadamard: bool = True  # with act: online Hadamard before every down projection

    def __post_init__(self):
        from .methods import get_method

        get_method(self.method)  # a clear error for unknown names
        if self.expert_coverage not in COVERAGE:
            raise ValueError(f"--expert-coverage must be one of {COVERAGE}, got {self.expert_coverage!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"--fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.min_tokens < 0:
            raise ValueError("--min-tokens must be >= 0")

    @property
    def resolved(self) -> bool:
        """Whether every method default has been filled in (``moeq.methods.resolve_config``)."""
        return None not in (self.agq, self.mse_clip, self.rotate, self.calib.source)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plan"] = {"default": self.plan.default.to_dict(),
                     "rules": [[p, a.to_dict() if a else None] for p, a in self.plan.rules],
                     "overrides": {k: (a.to_dict() if a else None) for k, a in self.plan.overrides.items()}}
        return d
