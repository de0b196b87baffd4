"""The profile: everything allocation needs, measured in one full-precision pass over the blocks.

``profile_model`` reuses the block loop's machinery (:mod:`moeq.capture`): block-0 inputs are
captured once, then per block one forward per calibration batch with hooks on *every* linear of the
block (nothing is quantized in this pass, so a single forward feeds all Hessians) and on the
post-attention norm (the predictor's input). From it come expert usage (routed tokens per expert),
the per-token cos(x, y) samples that train the block-importance predictor, and each linear's
sensitivity at each candidate width (:mod:`.sensitivity`), calibrated to the model's loss by per-block
gains (:mod:`.gain`, a few extra forwards). Outlier scores come from the weights alone.

A :class:`Profile` is plain data (JSON-serialisable) plus the saved predictors; plans are pure
functions of it (:func:`moeq.allocate.plan.build_plan`, :func:`moeq.allocate.search.allocate`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..capture.activations import Activations
from ..capture.loop import BlockContext, run_blocks
from ..capture.stats import GroupStats, c2_weight_fn
from ..models.lazy import ResidentSource
from ..config import QuantConfig
from ..evaluate.routing import balance_std
from ..models.adapter import ModelAdapter, get_submodule
from ..quant.primitives import QuantArgs
from ..utils.progress import log
from .gain import block_gains, part_key, rtn_local_error
from .modules import ModuleRecord, inventory
from .predictor import PredictorConfig, TokenSampler, save_predictors, token_cos, train_predictor
from .scores import outlier_scores
from .sensitivity import WEIGHTED_ROLES, candidate_losses, impact_hessians, routed_tokens

PROFILE_FORMAT = "moeq-profile"


@dataclass
class Profile:
    model: str
    model_type: str
    modules: list[ModuleRecord]
    num_experts: int = 0
    top_k: int = 0
    moe_blocks: list[int] = field(default_factory=list)
    calibration: dict | None = None
    tokens: int = 0  # calibration tokens
    usage: dict[int, list[int]] = field(default_factory=dict)  # block -> routed tokens per expert
    outlier: dict[str, float] = field(default_factory=dict)  # routed-expert linear -> outlier score
    importance: dict[int, dict] = field(default_factory=dict)  # block -> predictor facts ("score" = 1 - cos)
    candidates: list[int] = field(default_factory=list)
    group_size: int = 128
    symmetric: bool = True
    full_range: bool = False  # sensitivities measured on --full-range grids; plans made from it use them
    solver: str | None = None
    sensitivity: dict[str, dict[int, float]] = field(default_factory=dict)  # name -> bits -> error (see .gain)
    block_gain: dict[tuple, dict] = field(default_factory=dict)  # (block, "attn"|"ffn", bits) -> gain, kl, local_error
    seconds: dict = field(default_factory=dict)

    @property
    def balance_std(self) -> float:
        return balance_std(self.usage) if self.usage else float("nan")

    def block_importance(self) -> dict[int, float]:
        return {b: v["score"] for b, v in self.importance.items()}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"], d["version"] = PROFILE_FORMAT, 1
        d["balance_std"] = self.balance_std
        d["usage"] = {str(k): v for k, v in self.usage.items()}
        d["importance"] = {str(k): v for k, v in self.importance.items()}
        d["sensitivity"] = {n: {str(b): v for b, v in s.items()} for n, s in self.sensitivity.items()}
        d["block_gain"] = {":".join(map(str, k)): v for k, v in self.block_gain.items()}  # JSON keys are strings
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        if d.get("format") != PROFILE_FORMAT:
            raise ValueError("not a moeq profile (no format: moeq-profile); make one with "
                             "`moeq profile MODEL --out DIR`")
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        kw["modules"] = [ModuleRecord(**m) for m in d["modules"]]
        kw["usage"] = {int(k): v for k, v in d.get("usage", {}).items()}
        kw["importance"] = {int(k): v for k, v in d.get("importance", {}).items()}
        kw["sensitivity"] = {n: {int(b): v for b, v in s.items()} for n, s in d.get("sensitivity", {}).items()}
        kw["block_gain"] = {(int(k.split(":")[0]), k.split(":")[1], int(k.split(":")[2])): v
                            for k, v in d.get("block_gain", {}).items()}
        return cls(**kw)

    def save(self, out_dir: str | Path) -> Path:
        p = Path(out_dir) / "profile.json"
        p.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        p = Path(path)
        if p.is_dir():
            p = p / "profile.json"
        if not p.is_file():
            raise ValueError(f"{path} has no profile.json; make one with `moeq profile MODEL --out DIR`")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ValueError(f"{p} is not a readable moeq profile ({e}); regenerate it with `moeq profile`") from None


@dataclass(frozen=True)
class ProfileOptions:
    candidates: tuple[int, ...] = (2, 3, 4, 8)
    template: QuantArgs = QuantArgs(4, 128, True)  # group size and symmetry of every candidate grid
    sensitivity: bool = True
    predictor: bool = True
    predictor_cfg: PredictorConfig = PredictorConfig()
    batch_size: int = 8
    block_gain: bool = True  # calibrate sensitivities to the end-to-end KL (see .gain)
    gain_samples: int = 32  # calibration sequences the gains are measured on


@torch.no_grad()
def profile_model(adapter: ModelAdapter, calib: torch.Tensor, opts: ProfileOptions, cfg: QuantConfig,
                  scale_dtype, device="cpu", model_name: str = "", calib_info: dict | None = None,
                  predictors_out: str | Path | None = None) -> Profile:
    """Measure a :class:`Profile` of ``adapter.model`` on calibration ids (n, T). ``cfg`` picks the
    solver that measures sensitivities (its plan is ignored). Predictors are saved to ``predictors_out``."""
    if calib is None or calib.numel() == 0:
        raise ValueError("the calibration set is empty: give --calib a source with text and --nsamples >= 1")
    for b in opts.candidates:
        replace(opts.template, num_bits=b)  # validates each width
    if opts.block_gain and opts.gain_samples < 1:
        raise ValueError(f"--gain-samples must be >= 1, got {opts.gain_samples} (or pass --no-block-gain)")
    secs = {}
    t0 = time.perf_counter()
    with adapter.per_expert():
        return _profile(adapter, calib, opts, cfg, scale_dtype, device, model_name, calib_info, predictors_out,
                        secs, t0)


def _observe(ctx: BlockContext, modules: dict, weighted: dict, on_batch) -> tuple:
    """The profile's stage of the loop: plain and c^2-weighted statistics of the named linears, and the
    residual stream entering the MoE sub-block (the post-attention norm's input) of every batch."""
    adapter, i = ctx.adapter, ctx.i
    xs: list[torch.Tensor] = []
    norm = get_submodule(ctx.block, adapter.spec.post_attn_norm)
    handle = norm.register_forward_pre_hook(lambda m, a: xs.append(a[0])) if norm is not None else None
    try:
        with adapter.routing(i) as r:
            gs = GroupStats(modules, ctx.device) if modules else None
            gw = GroupStats(weighted, ctx.device, c2_weight_fn(r)) if weighted else None
            stats = [st for st in (gs, gw) if st is not None]

            def before():
                xs.clear()
                for st in stats:
                    st.new_forward()
            for st in stats:
                st.__enter__()
            try:
                ctx.forward(before, lambda k, h, y: on_batch(i, xs[0] if xs else h.to(ctx.device), y), collect=True)
            finally:
                for st in stats:
                    st.__exit__(None, None, None)
    finally:
        if handle is not None:
            handle.remove()
    return gs, gw


def _profile(adapter, calib, opts, cfg, scale_dtype, device, model_name, calib_info, predictors_out, secs, t0):
    from ..capture.quantize import solve_spec

    solve = solve_spec(cfg, {}, scale_dtype)
    records = {r.name: r for r in inventory(adapter)}
    outlier = outlier_scores(adapter)
    secs["outlier"] = time.perf_counter() - t0
    total = int(calib.numel())
    pc = opts.predictor_cfg
    usage, sens, importance, predictors, cos_sum, samplers = {}, {}, {}, {}, {}, {}
    with_gain = opts.sensitivity and opts.block_gain
    if with_gain and any(p.device.type != torch.device(device).type for p in adapter.model.parameters()):
        log.warning("block gains need the whole model on %s (it is onloaded block by block); ranking by local "
                    "errors only. Pass --no-block-gain to silence this.", device)
        with_gain = False
    rtn_err = {b: {} for b in opts.candidates}  # bits -> linear -> local RTN error
    gate = adapter.spec.moe.proj_names[0] if adapter.spec.moe else None

    def modules_of(i):
        prefix = adapter.block_name(i) + "."
        names = [r.name for r in records.values() if r.block == i]
        if not opts.sensitivity:  # usage only: the experts' first projections count their routed rows
            names = [n for n in names if records[n].role == "expert" and records[n].proj == gate]
        samplers[i], cos_sum[i] = TokenSampler(total, pc.max_tokens, pc.seed + i), 0.0
        return {n: get_submodule(adapter.blocks[i], n[len(prefix):]) for n in names}

    def on_batch(i, x, y):
        if opts.predictor:
            c = token_cos(x, y)  # (b*T,)
            cos_sum[i] += float(c.double().sum())
            samplers[i].add(x, c)

    def weighted_of(i):
        if not opts.sensitivity:
            return {}
        prefix = adapter.block_name(i) + "."
        return {n: get_submodule(adapter.blocks[i], n[len(prefix):]) for n, r in records.items()
                if r.block == i and r.role in WEIGHTED_ROLES}

    def on_block(i, gs, gw):
        names = list(gs.modules) if gs is not None else []
        if adapter.is_moe_block(i):
            tok = routed_tokens(gs, names)
            base = f"{adapter.block_name(i)}.{adapter.spec.moe.experts}"
            usage[i] = [tok.get(f"{base}.{e}.{gate}", 0) for e in range(adapter.num_experts)]
        if opts.sensitivity:
            weights = {n: m.weight.data for n, m in gs.modules.items()}
            impact = impact_hessians(gs, gw, records, total)
            sens.update(candidate_losses(weights, gs, impact, records, list(opts.candidates), opts.template,
                                         solve, device))
            for b in rtn_err if with_gain else ():
                args = replace(opts.template, num_bits=b)
                rtn_err[b].update({n: rtn_local_error(W, impact[n], args, scale_dtype) for n, W in weights.items()})

    t = time.perf_counter()
    source = ResidentSource(adapter.model, device)
    acts = Activations.capture(adapter.model, adapter.blocks[0], list(calib.split(opts.batch_size)), device, "cpu")
    run_blocks(source, acts, lambda ctx: on_block(ctx.i, *_observe(ctx, modules_of(ctx.i), weighted_of(ctx.i),
                                                                   on_batch)), desc="profile blocks")
    secs["calibration_pass"] = time.perf_counter() - t
    gains = {}
    if with_gain:
        t = time.perf_counter()
        gains = block_gains(adapter, records, rtn_err, calib[:opts.gain_samples], opts.template, scale_dtype,
                            opts.batch_size)
        for n, per_bits in sens.items():  # calibrated, then kept non-increasing in width (more bits never cost more)
            cal, best = {}, float("inf")
            for b in sorted(per_bits):
                best = cal[b] = min(best, per_bits[b] * gains[part_key(records[n], b)]["gain"])
            sens[n] = cal
        secs["block_gains"] = time.perf_counter() - t
    t = time.perf_counter()
    for i, sampler in samplers.items() if opts.predictor else ():
        X, tgt = sampler.data()
        pred, info = train_predictor(X, tgt, pc)
        info["measured_cos"] = cos_sum[i] / total
        info["score"] = 1.0 - info["predicted_cos"]
        importance[i], predictors[i] = info, pred
        log.debug("block %d predictor: %s", i, info)
    secs.update(predictor_training=time.perf_counter() - t, total=time.perf_counter() - t0)
    if predictors and predictors_out is not None:
        save_predictors(predictors, predictors_out)
    model = adapter.model
    return Profile(model=model_name, model_type=model.config.model_type, modules=list(records.values()),
                   num_experts=adapter.num_experts, top_k=adapter.top_k, moe_blocks=adapter.moe_blocks(),
                   calibration=calib_info, tokens=total, usage=usage, outlier=outlier, importance=importance,
                   candidates=list(opts.candidates) if opts.sensitivity else [],
                   group_size=opts.template.group_size, symmetric=opts.template.symmetric,
                   full_range=opts.template.full_range,
                   solver=solve.solver.name if opts.sensitivity else None, sensitivity=sens, block_gain=gains,
                   seconds={k: round(v, 3) for k, v in secs.items()})
