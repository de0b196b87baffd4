"""The method registry: every ``--method`` as one declaration, shared by the library, CLI, plan and bench.

A :class:`Method` names the stages it composes around the one block loop: a function-preserving
transform before (``rotate``: norm fusion + random Hadamard of the residual stream), a block search
(``search``: "awq" or "lwc", :data:`SEARCHES`), the per-linear solver (``solver``: a name in
:data:`moeq.solvers.registry.SOLVERS`) and its defaults (calibration source, AGQ/affinity weighting,
MSE clip). :func:`resolve_config` fills every field a :class:`~moeq.config.QuantConfig` leaves at
``None`` from these defaults; ``moeq.quantize`` calls it, so the Python API, ``moeq quantize``,
``moeq plan --measure`` and ``moeq bench`` run the same thing for the same method. Adding a method is
one :func:`register_method` call (plus :func:`~moeq.solvers.registry.register_solver` for a new solver).

| method      | transform | search                | solver | calibration | paper |
|-------------|-----------|-----------------------|--------|-------------|-------|
| rtn         | -         | -                     | RTN    | none        | - |
| gptq        | -         | -                     | GPTQ   | wikitext2   | Frantar et al. 2023 |
| moequant    | -         | -                     | GPTQ + AGQ, MSE clip | EBSS | Hu et al. 2025 |
| awq         | -         | AWQ scales + clips    | RTN    | wikitext2   | Lin et al. 2024 |
| moequant+   | -         | affinity-weighted AWQ | RTN    | EBSS        | Hu et al. 2025 |
| lwc         | -         | learnable clipping    | RTN    | wikitext2   | Shao et al. 2024 (LWC only) |
| quarot-gptq | rotation  | -                     | GPTQ, MSE clip | wikitext2 | Ashkboos et al. 2024 |
| moequant++  | rotation  | -                     | GPTQ + AGQ, MSE clip | EBSS | Hu et al. 2025 |
| gptaq       | -         | -                     | GPTQ on the FP model's outputs | wikitext2 | Li et al. 2025 |
| blocktune   | -         | -                     | RTN or GPTAQ, then the block tuner | wikitext2 | SignRound-style, MoE terms |

``omniquant`` is an alias of ``lwc``: OmniQuant's learnable weight clipping without its learnable
equivalent transformation (LET); reports say so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import QuantConfig


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line: what it does
    paper: str
    solver: str = "gptq"  # moeq.solvers.registry name
    calib: str | None = "wikitext2"  # default calibration source; None: data-free
    search: str | None = None  # block search: a key of SEARCHES
    agq: bool = False  # affinity-weighted statistics (AGQ Hessians; AWQ statistics/losses for awq)
    mse_clip: bool = False
    rotate: bool = False
    tune: bool = False  # block tuner after the solve stage (moeq.capture.tune_stage)
    gptaq: bool = False  # GPTQ targets the FP model's outputs on its own activations (moeq.capture.fp_stream)
    exports: tuple[str, ...] = ("compressed-tensors",)
    aliases: tuple[str, ...] = ()
    note: str | None = None  # added to every report of the method

    def describe(self) -> str:
        extra = f" (alias: {', '.join(self.aliases)})" if self.aliases else ""
        ranks = "one process only" if _stage(self) in SINGLE_PROCESS else "torchrun ok"
        return (f"{self.name}{extra}: {self.summary}; calibration {self.calib or 'none'}; exports "
                f"{', '.join(self.exports)}; {ranks}; {self.paper}")


METHODS: dict[str, Method] = {}
ALIASES: dict[str, str] = {}
SEARCHES = ("awq", "lwc")  # implemented by moeq.capture.awq_stage / lwc_stage
# why a block search or the tuner runs in one process only (torchrun runs are refused with this)
SINGLE_PROCESS = {
    "awq": "its scale and clip search scores every candidate on all calibration rows of a block at once",
    "lwc": "it trains clipping factors by gradient descent over all calibration rows of a block",
    "tune": "it tunes a block's integers and scales by gradient steps over all calibration rows of the block",
    "gptaq": "it carries the FP model's activations next to the quantized ones in one process",
}


def _stage(m: "Method") -> str | None:
    """The method's single-process stage, if any (a key of SINGLE_PROCESS)."""
    return "tune" if m.tune else "gptaq" if m.gptaq else m.search


def register_method(m: Method) -> Method:
    if m.search is not None and m.search not in SEARCHES:
        raise ValueError(f"method {m.name}: unknown search {m.search!r}; choose from {', '.join(SEARCHES)}")
    METHODS[m.name] = m
    ALIASES.update({a: m.name for a in m.aliases})
    return m


def get_method(name: str) -> Method:
    key = ALIASES.get(name, name)
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(method_names())} (see `moeq methods`)")
    return METHODS[key]


def method_names() -> list[str]:
    """Every accepted --method value: registered names, then aliases."""
    return list(METHODS) + list(ALIASES)


def single_process_reason(name: str) -> str | None:
    """Why ``--method name`` cannot run on several ranks (torchrun), as one line with the fix; None if it can."""
    stage = _stage(get_method(name))
    if stage not in SINGLE_PROCESS:
        return None
    return (f"--method {name} runs in one process only: {SINGLE_PROCESS[stage]}, which moeq does not yet split "
            "across ranks; run it without torchrun (one process, one device)")


def resolve_config(cfg: QuantConfig, is_moe: bool = True) -> tuple[QuantConfig, list[str]]:
    """``cfg`` with the method's canonical name and every ``None`` default filled in; -> (cfg, notes).

    Explicit fields always win. A dense model has no experts to balance, so an EBSS default falls back
    to wikitext2 (an explicit ``calib.source="ebss"`` still fails later, with a clear message)."""
    m = get_method(cfg.method)
    notes = [m.note] if m.note else []
    source = cfg.calib.source
    if source is None:
        source = m.calib or "wikitext2"
        if source == "ebss" and not is_moe:
            source = "wikitext2"
            notes.append(f"{m.name}: the model has no MoE layers, so EBSS does not apply; calibrated on wikitext2")
    out = replace(cfg, method=m.name, calib=replace(cfg.calib, source=source),
                  agq=m.agq if cfg.agq is None else cfg.agq,
                  mse_clip=m.mse_clip if cfg.mse_clip is None else cfg.mse_clip,
                  rotate=m.rotate if cfg.rotate is None else cfg.rotate,
                  gptaq=(m.gptaq and not (m.tune and cfg.tune.start == "rtn")) if cfg.gptaq is None else cfg.gptaq)
    if out.gptaq and solver_name(out) != "gptq":
        raise ValueError(f"--gptaq changes GPTQ's target, and --method {m.name} does not solve with GPTQ; "
                         "use a GPTQ-based method (gptq, moequant, quarot-gptq, moequant++, blocktune)")
    return out, notes


def fp_stream_needed(cfg: QuantConfig) -> bool:
    """Whether a resolved config carries the FP model's activations next to the quantized ones."""
    return bool(cfg.gptaq) or (get_method(cfg.method).tune and cfg.tune.asymmetric)


def solver_name(cfg: QuantConfig) -> str:
    """The solve stage's solver: the method's, except a block tuner told to start from RTN."""
    m = get_method(cfg.method)
    return "rtn" if m.tune and cfg.tune.start == "rtn" else m.solver


def needs_calibration(cfg: QuantConfig) -> bool:
    """Whether the run reads calibration data: a solver with statistics, a block search or the tuner."""
    from .solvers.registry import get_solver

    m = get_method(cfg.method)
    return get_solver(solver_name(cfg)).needs_hessian or m.search is not None or m.tune


_OMNI = "OmniQuant's learnable weight clipping only (no learnable equivalent transformation, LET)"
for _m in (
    Method("rtn", "round to nearest, min-max scales", "-", solver="rtn", calib=None),
    Method("gptq", "GPTQ, experts batched per layer", "Frantar et al., ICLR 2023"),
    Method("moequant", "GPTQ with affinity-guided Hessians (AGQ) and MSE clip on an EBSS self-sampled set",
           "MoEQuant, Hu et al. 2025", calib="ebss", agq=True, mse_clip=True),
    Method("awq", "activation-aware scales (router compensated) + clip search, then RTN", "AWQ, Lin et al., MLSys 2024",
           solver="rtn", search="awq"),
    Method("moequant+", "affinity-weighted AWQ on an EBSS set, then RTN", "MoEQuant, Hu et al. 2025", solver="rtn",
           calib="ebss", search="awq", agq=True),
    Method("lwc", "learnable weight clipping trained per block against its FP output, then RTN",
           "OmniQuant (LWC only), Shao et al., ICLR 2024", solver="rtn", search="lwc", aliases=("omniquant",),
           note=f"lwc (alias omniquant): {_OMNI}"),
    Method("quarot-gptq", "QuaRot rotation (norm fusion + random Hadamard) then GPTQ with MSE clip",
           "QuaRot, Ashkboos et al., NeurIPS 2024", mse_clip=True, rotate=True),
    Method("moequant++", "rotation + AGQ-GPTQ with MSE clip on an EBSS set", "MoEQuant, Hu et al. 2025",
           calib="ebss", agq=True, mse_clip=True, rotate=True),
    Method("gptaq", "GPTQ whose target is the FP model's output on its own activations (asymmetric calibration)",
           "GPTAQ, Li et al. 2025 (arXiv 2504.02692)", gptaq=True),
    Method("blocktune", "RTN (--tune-start gptaq: GPTAQ), then per block signed-gradient tuning of rounding and "
           "scales against the FP block output, with router-KL and affinity-weighted expert terms",
           "SignRound (Cheng et al. 2023) objective, MoE terms after EAQuant / MoEQuant", tune=True, gptaq=True,
           aliases=("moetune",)),
):
    register_method(_m)
