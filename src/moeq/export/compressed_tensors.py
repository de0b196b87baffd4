"""Write a quantized model as a compressed-tensors ``pack-quantized`` checkpoint.

The integers each solver chose are packed as they are (compressed-tensors' own ``pack_to_int32``),
with ``weight_scale`` in the checkpoint's dtype, ``weight_shape`` and, for asymmetric grids, the
packed ``weight_zero_point``. Keys follow the layout of the family's own Hugging Face checkpoints
(per expert, e.g. ``mlp.experts.3.gate_proj`` or Mixtral's ``block_sparse_moe.experts.3.w1``), which is
what vLLM and transformers' loaders expect. ``quantization_config`` holds one config group per
distinct scheme with regex targets, and ``ignore`` lists the modules kept in full precision
(routers, shared-expert gates, lm_head). Everything else (embeddings, norms, biases, routers) is
stored unchanged in the checkpoint dtype. Tensors are produced per part (a block, or the embeddings and
head) so the writer (:mod:`.writer`) can stream them to disk as each block finishes.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import torch

from ..models.adapter import ModelAdapter
from ..quant.primitives import QuantArgs
from ..solvers.base import QuantResult
from .containers import widen

def config_groups(names_by_args: dict[QuantArgs, list[str]], all_names: list[str]) -> dict[QuantArgs, list[str]]:
    """Compact regex targets per scheme. A name's numbers (expert, then layer) are wildcarded as long as
    every linear matching the wider pattern has the same scheme, so uniform models get a handful of
    patterns and mixed plans stay exact. Linears left in full precision count as a scheme of their own."""
    scheme_of = {n: a for a, ns in names_by_args.items() for n in ns}
    uniform: dict[str, bool] = {}

    def is_uniform(pattern: str, args) -> bool:
        if pattern not in uniform:
            rx = re.compile(pattern)
            uniform[pattern] = all(scheme_of.get(m) == args for m in all_names if rx.fullmatch(m))
        return uniform[pattern]

    out: dict[QuantArgs, set[str]] = defaultdict(set)
    for name, args in scheme_of.items():
        parts = re.split(r"(\.\d+\.)", name)
        pattern = [p.replace(".", r"\.") if re.fullmatch(r"\.\d+\.", p) else re.escape(p) for p in parts]
        for k in reversed([i for i, p in enumerate(parts) if re.fullmatch(r"\.\d+\.", p)]):
            trial = pattern.copy()
            trial[k] = r"\.\d+\."
            if is_uniform("".join(trial), args):
                pattern = trial
        out[args].add("".join(pattern))
    return {a: sorted(_merge_alternatives(sorted(p))) for a, p in out.items()}


def _merge_alternatives(patterns: list[str]) -> set[str]:
    """Merge patterns that differ only in their last name component: a\\.q_proj, a\\.k_proj -> a\\.(q_proj|k_proj)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for p in patterns:
        head, _, tail = p.rpartition(r"\.")
        groups[head].append(tail)
    return {f"re:{head}\\.({'|'.join(sorted(tails))})$" if len(tails) > 1 else f"re:{head}\\.{tails[0]}$"
            for head, tails in groups.items()}


def quantization_config(adapter: ModelAdapter, schemes: dict[str, QuantArgs], act=None) -> dict:
    """The ``quantization_config`` dict for config.json (compressed-tensors schema) of the quantized linears
    ``schemes`` (full name -> grid); ``act`` (:class:`moeq.quant.act.ActQuantArgs`) adds the dynamic
    per-token ``input_activations`` scheme."""
    act_args = act.compressed_tensors_args() if act is not None else None
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_args: dict[QuantArgs, list[str]] = defaultdict(list)
    for name, args in schemes.items():
        by_args[args].append(adapter.checkpoint_name(name))
    all_names = [adapter.checkpoint_name(li.name) for li in adapter.linears()]
    routed = {schemes.get(li.name) for li in adapter.linears() if li.role == "expert"}
    groups = {}
    # the routed experts' group first: transformers reads all fused experts with the first group naming experts
    for k, (args, targets) in enumerate(sorted(config_groups(by_args, all_names).items(),
                                               key=lambda kv: (kv[0] not in routed, kv[0].num_bits,
                                                               kv[0].group_size, kv[0].symmetric))):
        groups[f"group_{k}"] = QuantizationScheme(
            targets=targets,
            weights=QuantizationArgs(num_bits=args.num_bits, type="int", symmetric=args.symmetric,
                                     strategy=args.strategy,
                                     group_size=None if args.group_size == -1 else args.group_size),
            input_activations=QuantizationArgs(**act_args) if act_args else None,
        )
    ignore = [adapter.checkpoint_name(n) for n in adapter.full_precision_modules()]
    unquantized = [adapter.checkpoint_name(li.name) for li in adapter.linears() if li.name not in schemes]
    cfg = QuantizationConfig(config_groups=groups, ignore=ignore + unquantized, format="pack-quantized",
                             quantization_status="compressed")
    d = cfg.model_dump(exclude_none=False)
    d["version"] = ct_version
    return json.loads(json.dumps(d, default=str))


def packed_tensors(prefix: str, r: QuantResult, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized tensors of one linear. A K-quant float-minimum grid (GGUF-only: the run
    refuses compressed-tensors output for it) keeps fp32 scales and float zero points, unpacked, in the shards
    the run streams and converts to GGUF."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out = {
        f"{prefix}.weight_packed": pack_to_int32(r.q.to(torch.int8).contiguous(), r.args.num_bits).contiguous(),
        f"{prefix}.weight_scale": r.scale.to(torch.float32 if r.args.float_zero else scale_dtype).contiguous(),
        f"{prefix}.weight_shape": torch.tensor(list(r.q.shape), dtype=torch.int64),
    }
    if r.args.float_zero:
        out[f"{prefix}.weight_zero_point"] = r.zero.float().contiguous()
    elif not r.args.symmetric:
        out[f"{prefix}.weight_zero_point"] = pack_to_int32(r.zero.to(torch.int8).contiguous(), r.args.num_bits,
                                                           packed_dim=0).contiguous()
    return out


def part_tensors(adapter: ModelAdapter, module: torch.nn.Module, prefix: str, results: dict[str, QuantResult],
                 dtype: torch.dtype, skip: tuple[str, ...] = (), storage: dict[str, QuantArgs] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``module`` (full names start with ``prefix``): its parameters and persistent
    buffers in the checkpoint dtype, every quantized linear (``results``, full names) as packed tensors on
    its storage scheme (``storage``, see :mod:`.containers`; default: its own grid), all under the family's
    checkpoint names. ``skip``: full tensor names left out (a tied head)."""
    sd: dict[str, torch.Tensor] = {}
    for rel, t in module.state_dict().items():
        key = f"{prefix}{rel}"
        mod, _, leaf = key.rpartition(".")
        if (mod in results and leaf == "weight") or key in skip:
            continue
        sd[adapter.checkpoint_name(key)] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
    for name, r in results.items():
        r = widen(r, storage[name]) if storage is not None else r
        sd.update(packed_tensors(adapter.checkpoint_name(name), r, dtype))
    return sd


def bf16_size_bytes(adapter: ModelAdapter) -> int:
    """What the same model takes as a plain bf16 checkpoint (tied weights once)."""
    return adapter.param_count() * 2


def write_config(folder, adapter: ModelAdapter, schemes: dict[str, QuantArgs], dtype: torch.dtype, act=None,
                 tokenizer=None, source_dir=None) -> None:
    """config.json with ``quantization_config``, the generation config (the source's own file when it has
    one) and the tokenizer files."""
    import shutil
    from pathlib import Path

    folder = Path(folder)
    cfg = adapter.model.config.to_dict()
    cfg["dtype"] = str(dtype).replace("torch.", "")
    cfg.pop("torch_dtype", None)
    cfg["quantization_config"] = quantization_config(adapter, schemes, act)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    src_gen = Path(source_dir) / "generation_config.json" if source_dir else None
    if src_gen is not None and src_gen.is_file():
        shutil.copyfile(src_gen, folder / "generation_config.json")
    elif getattr(adapter.model, "generation_config", None) is not None:
        adapter.model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
