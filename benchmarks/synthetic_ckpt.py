"""Random-init Hugging Face MoE checkpoints of any size, written tensor by tensor (inputs of the scale benchmark).

Writes a checkpoint of a real transformers model class (Qwen3-MoE or DeepSeek-V3 presets; any MoE family
transformers knows through the Python API) without ever building the model: the parameter names and shapes
come from a skeleton on the meta device, then every tensor is generated on its own (a torch.Generator seeded
from ``--seed`` and the tensor's name), written straight into the open safetensors shard and dropped. The
writer's memory is the Python process (torch + transformers, about 0.4 GB) plus one tensor, whatever the
checkpoint size (measured: 0.46 GB peak RSS for a 0.1 GB and for a 4 GB checkpoint; about 0.25 GB/s on this
machine's CPU). The shard layout is planned from the shapes before writing, so each shard
is streamed to disk in the safetensors format (8-byte header length, JSON header, raw little-endian data)
instead of being collected in a dict for ``safetensors.torch.save_file``, which would hold a whole shard
(``--shard-size``) in memory.

Keys follow what the family's hub checkpoints (and transformers' ``save_pretrained``) contain: routed experts
per expert in the family's own spelling (``mlp.experts.E.{gate,up,down}_proj.weight`` for Qwen3-MoE,
Qwen2-MoE, OLMoE, DeepSeek-V3; ``block_sparse_moe.experts.E.w1/w3/w2.weight`` and ``block_sparse_moe.gate``
for Mixtral), not the fused 3-D parameters transformers v5 holds in memory. ``--self-test`` checks this against
``save_pretrained`` of tiny real models of five families.

Values: linear weights and embeddings ~ N(0, --std) (so a forward pass stays finite), norm weights 1, biases
and buffers (DeepSeek-V3's ``e_score_correction_bias``, float32 as on the hub) 0. ``--fp8`` stores every 2-D
linear weight of the decoder blocks (attention and MLP/expert projections; not embeddings, lm_head, norms or
routers) as float8_e4m3fn with a float32 ``<name>_scale_inv`` per 128x128 block (DeepSeek-V3 / Qwen3-FP8
block-FP8 layout, ``quantization_config.quant_method = "fp8"``).

The output folder (shards ``model-0000i-of-0000N.safetensors``, ``model.safetensors.index.json``,
``config.json``, ``generation_config.json``, the tokenizer of moeq's bundled qwen2-moe-tiny (vocab 8192) and
``synthetic_ckpt.json`` with the generator settings) is written into a temporary sibling folder and renamed
into place at the end.

    python benchmarks/synthetic_ckpt.py --arch qwen3_moe --size-gb 2 --out /tmp/moeq_scale/qwen3_moe_2gb
    python benchmarks/synthetic_ckpt.py --arch deepseek_v3 --size-gb 0.5 --fp8 --out /tmp/ds_fp8 --verify
    python benchmarks/synthetic_ckpt.py --size-gb 26 --plan-only  # layers, bytes, tensors, shards as JSON
    python benchmarks/synthetic_ckpt.py --self-test     # keys vs save_pretrained, load + logits, FP8 dequant check
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MOEQ_QUIET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GB = 10**9
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
META_FILE = "synthetic_ckpt.json"

# How each family's checkpoints spell what transformers v5 holds as fused experts
# (``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I)): per-expert names of the
# (gate, up, down) projections, and regex renames applied to every key of a decoder block.
CKPT_LAYOUTS: dict[str, tuple[tuple[str, str, str], tuple[tuple[str, str], ...]]] = {
    "qwen3_moe": (("gate_proj", "up_proj", "down_proj"), ()),
    "qwen2_moe": (("gate_proj", "up_proj", "down_proj"), ()),
    "olmoe": (("gate_proj", "up_proj", "down_proj"), ()),
    "deepseek_v3": (("gate_proj", "up_proj", "down_proj"), ()),
    "mixtral": (("w1", "w3", "w2"), ((r"\.mlp\.", ".block_sparse_moe."),)),
}
BLOCK_KEY = re.compile(r"^model\.layers\.\d+\.")
ROUTER_LEAVES = ("gate", "shared_expert_gate")  # 2-D weights of a block that stay in high precision with --fp8


# ----------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Entry:
    """One tensor of the checkpoint: its key, shape, stored dtype and how its values are made."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    init: str  # "normal" | "ones" | "zeros" | "fp8" (block-FP8 weight) | "scale" (its scale_inv, right after it)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def meta_model(cfg):
    """The transformers model of ``cfg`` on the meta device (shapes only, no memory)."""
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def _tied(cfg) -> bool:
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(text, "tie_word_embeddings", False))


def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()


def _rename(model_type: str, name: str) -> str:
    for pat, rep in CKPT_LAYOUTS.get(model_type, ((), ()))[1]:
        if BLOCK_KEY.match(name):
            name = re.sub(pat, rep, name)
    return name


def _fp8_eligible(name: str, shape: tuple[int, ...]) -> bool:
    if not BLOCK_KEY.match(name) or not name.endswith(".weight") or len(shape) != 2:
        return False
    return name.split(".")[-2] not in ROUTER_LEAVES


def plan_tensors(cfg, dtype: torch.dtype = torch.bfloat16, fp8: bool = False) -> list[Entry]:
    """Every tensor the checkpoint of ``cfg`` holds, in model order, with the family's on-disk key names."""
    model = meta_model(cfg)
    mt = cfg.model_type
    buffers = {n for n, _ in model.named_buffers()}
    seen: set[int] = set()
    out: list[Entry] = []

    def add(name: str, shape: tuple[int, ...], init: str, dt: torch.dtype = dtype):
        name = _rename(mt, name)
        if fp8 and init == "normal" and _fp8_eligible(name, shape):
            out.append(Entry(name, shape, torch.float8_e4m3fn, "fp8"))
            out.append(Entry(name + "_scale_inv", (math.ceil(shape[0] / FP8_BLOCK), math.ceil(shape[1] / FP8_BLOCK)),
                             torch.float32, "scale"))
        else:
            out.append(Entry(name, shape, dt, init))

    for name, t in model.state_dict(keep_vars=True).items():  # parameters and persistent buffers only
        if id(t) in seen or (name.startswith("lm_head.") and _tied(cfg)):
            continue  # tied weights are stored once (under the embedding), as save_pretrained does
        seen.add(id(t))
        shape = tuple(t.shape)
        mod_name, _, leaf = name.rpartition(".")
        if name in buffers:
            add(name, shape, "zeros", t.dtype)  # e.g. DeepSeek-V3 e_score_correction_bias (float32 on the hub)
        elif t.dim() == 3 and mod_name.endswith("experts"):
            if mt not in CKPT_LAYOUTS:
                raise NotImplementedError(f"{mt}: fused experts {name} {shape}; add its key layout to CKPT_LAYOUTS")
            (g, u, d), _ = CKPT_LAYOUTS[mt]
            if leaf == "gate_up_proj":  # (E, 2I, H): gate rows first, then up rows; emit each expert's three
                n_exp, two_i, hidden = shape
                inter = two_i // 2
                for e in range(n_exp):
                    add(f"{mod_name}.{e}.{g}.weight", (inter, hidden), "normal")
                    add(f"{mod_name}.{e}.{u}.weight", (inter, hidden), "normal")
                    add(f"{mod_name}.{e}.{d}.weight", (hidden, inter), "normal")
            elif leaf == "down_proj":  # (E, H, I): already emitted with gate_up_proj
                continue
            else:
                raise NotImplementedError(f"{mt}: unexpected fused expert parameter {name} {shape}")
        elif leaf == "bias":
            add(name, shape, "zeros")
        elif _is_norm(model.get_submodule(mod_name)):
            add(name, shape, "ones")
        else:
            add(name, shape, "normal")
    names = [e.name for e in out]
    assert len(set(names)) == len(names), "duplicate keys in the plan"
    return out


def plan_shards(entries: list[Entry], shard_bytes: int) -> list[list[Entry]]:
    """Greedy shards of at most ``shard_bytes`` (a bigger single tensor gets its own); a block-FP8 weight and
    its scale_inv stay in one shard."""
    units: list[list[Entry]] = []
    for e in entries:
        if e.init == "scale":
            units[-1].append(e)
        else:
            units.append([e])
    shards: list[list[Entry]] = [[]]
    size = 0
    for u in units:
        ub = sum(e.nbytes for e in u)
        if shards[-1] and size + ub > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(u)
        size += ub
    return shards


def parse_size(s: str | int) -> int:
    """'1GB', '500MB', '2GiB', '4e9' or an int -> bytes (decimal units like transformers' max_shard_size)."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", s, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {s!r} (e.g. 1GB, 500MB, 2GiB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index((m.group(2) or " ").upper()))


# ------------------------------------------------------------------------------------------------ values


def tensor_seed(seed: int, name: str) -> int:
    """A tensor's generator seed: its values depend on (seed, key) only, not on order or sharding."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


def normal_fp32(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """The float32 values of a normally initialised tensor (before any cast): regenerable from its key."""
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.randn(shape, generator=g, dtype=torch.float32).mul_(std)


def fp8_block_quantize(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv (ceil(out/block), ceil(in/block))): per block scale = amax/448,
    weight ~= fp8.float() * scale_inv expanded over the blocks."""
    out_f, in_f = w.shape
    ob, ib = math.ceil(out_f / block), math.ceil(in_f / block)
    blocks = F.pad(w.float(), (0, ib * block - in_f, 0, ob * block - out_f)).view(ob, block, ib, block)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(1e-12)
    q = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(ob * block, ib * block)[:out_f, :in_f].contiguous(), scale


def fp8_block_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    out_f, in_f = q.shape
    s = scale_inv.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_f, :in_f]
    return q.float() * s


class ValueMaker:
    """Makes each planned tensor on demand; a block-FP8 weight's scale_inv is kept until its entry comes."""

    def __init__(self, seed: int, std: float):
        self.seed, self.std = seed, std
        self._scales: dict[str, torch.Tensor] = {}

    def __call__(self, e: Entry) -> torch.Tensor:
        if e.init == "normal":
            return normal_fp32(e.name, e.shape, self.seed, self.std).to(e.dtype)
        if e.init == "ones":
            return torch.ones(e.shape, dtype=e.dtype)
        if e.init == "zeros":
            return torch.zeros(e.shape, dtype=e.dtype)
        if e.init == "fp8":
            q, s = fp8_block_quantize(normal_fp32(e.name, e.shape, self.seed, self.std))
            self._scales[e.name + "_scale_inv"] = s
            return q
        if e.init == "scale":
            return self._scales.pop(e.name)
        raise ValueError(e.init)


# ------------------------------------------------------------------------------------------------ writing


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def write_shard(path: Path, entries: list[Entry], make) -> int:
    """Stream one safetensors file: header from the planned shapes, then each tensor made and written in turn."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for e in entries:
        header[e.name] = {"dtype": ST_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for e in entries:
            t = make(e)
            if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                raise RuntimeError(f"{e.name}: made {t.dtype} {tuple(t.shape)}, planned {e.dtype} {e.shape}")
            f.write(_raw(t))
            del t
    return off


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def bundled_tokenizer_dir() -> Path:
    """src/moeq/bundled/qwen2-moe-tiny, found without importing moeq (its code may be mid-rewrite)."""
    spec = importlib.util.find_spec("moeq")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    roots.append(str(Path(__file__).resolve().parents[1] / "src" / "moeq"))
    for r in roots:
        d = Path(r) / "bundled" / "qwen2-moe-tiny"
        if (d / "tokenizer.json").is_file():
            return d
    raise FileNotFoundError("moeq's bundled qwen2-moe-tiny tokenizer not found")


def write_checkpoint(cfg, out: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16, fp8: bool = False,
                     std: float = 0.02, seed: int = 0, shard_size: str | int = "1GB", overwrite: bool = False,
                     tokenizer_dir: str | os.PathLike | None = None, extra_meta: dict | None = None,
                     log=print) -> dict:
    """Write a random-init checkpoint of ``cfg`` into ``out`` tensor by tensor; returns a summary dict."""
    import transformers

    t0 = time.perf_counter()
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (use --overwrite to replace it)")
    entries = plan_tensors(cfg, dtype, fp8)
    shards = plan_shards(entries, parse_size(shard_size))
    total = sum(e.nbytes for e in entries)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if total + 64 * 2**20 > free:
        raise OSError(f"not enough disk for {out}: needs {total / GB:.2f} GB, {free / GB:.2f} GB free "
                      f"on {out.parent}")
    from moeq.utils.fs import atomic_dir

    with atomic_dir(out, overwrite=True, marker=META_FILE) as tmp:  # a temporary sibling, renamed into place
        make = ValueMaker(seed, std)
        n = len(shards)
        weight_map = {}
        for i, sh in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            write_shard(tmp / fname, sh, make)
            weight_map.update({e.name: fname for e in sh})
            log(f"  [{i + 1}/{n}] {fname}: {len(sh)} tensors, {sum(e.nbytes for e in sh) / GB:.3f} GB, "
                f"{time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_bytes() / GB:.3f} GB")
        assert not make._scales, "scale_inv left unwritten"
        with open(tmp / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        d = cfg.to_dict()
        d["architectures"] = [type(meta_model(cfg)).__name__] if not d.get("architectures") else d["architectures"]
        d["dtype"] = DTYPE_NAMES[dtype]
        if fp8:
            d["quantization_config"] = dict(FP8_QUANT_CONFIG)
        with open(tmp / "config.json", "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
        try:
            transformers.GenerationConfig.from_model_config(cfg).to_json_file(tmp / "generation_config.json")
        except Exception as e:  # optional file
            log(f"  (no generation_config.json: {e})")
        src = Path(tokenizer_dir) if tokenizer_dir else bundled_tokenizer_dir()
        for fn in TOKENIZER_FILES:
            if (src / fn).is_file():
                shutil.copy2(src / fn, tmp / fn)
        layers = getattr(cfg.get_text_config(), "num_hidden_layers", None)
        summary = {
            "generator": "benchmarks/synthetic_ckpt.py", "model_type": cfg.model_type, "layers": layers,
            "dtype": DTYPE_NAMES[dtype], "fp8": fp8, "seed": seed, "std": std, "total_size": total,
            "total_gb": total / GB, "n_tensors": len(entries), "n_shards": n, "shard_size": parse_size(shard_size),
            **(extra_meta or {}),
        }
        with open(tmp / META_FILE, "w") as f:
            json.dump(summary, f, indent=2)
    return {**summary, "out": str(out), "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}


# ------------------------------------------------------------------------------------------------ presets


def _bytes_of(cfg, dtype: torch.dtype, fp8: bool) -> int:
    return sum(e.nbytes for e in plan_tensors(cfg, dtype, fp8))


def _sized(make, target_gb: float, min_layers: int, dtype: torch.dtype, fp8: bool):
    """make(num_layers) -> config; pick the layer count whose checkpoint is closest to target_gb (exact bytes
    from the planned shapes: fixed part + per-layer part, measured at min_layers and min_layers + 1)."""
    b0 = _bytes_of(make(min_layers), dtype, fp8)
    per_layer = _bytes_of(make(min_layers + 1), dtype, fp8) - b0
    layers = max(min_layers, min_layers + round((target_gb * GB - b0) / per_layer))
    return make(layers)


def _dtype_for(dtype_bytes: int) -> torch.dtype:
    return {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]


def qwen3_moe_config(target_gb: float, dtype_bytes: int = 2, fp8: bool = False, num_layers: int | None = None,
                     **overrides):
    """A Qwen3MoeConfig (hidden 1024, 64 experts of 512, top-4, vocab 8192) whose checkpoint is ~target_gb GB
    (about 0.207 GB per layer in bf16 plus 0.034 GB embeddings and lm_head). ``overrides`` replace fields
    (e.g. num_experts=16 for a smaller layer); ``num_layers`` fixes the depth instead of target_gb."""
    import transformers

    kw = dict(hidden_size=1024, moe_intermediate_size=512, num_experts=64, num_experts_per_tok=4,
              num_attention_heads=16, num_key_value_heads=4, head_dim=64, intermediate_size=2048, vocab_size=8192,
              max_position_embeddings=4096, tie_word_embeddings=False, norm_topk_prob=True,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)
    kw.update(overrides)

    def make(n):
        return transformers.Qwen3MoeConfig(num_hidden_layers=n, **kw)

    return make(num_layers) if num_layers else _sized(make, target_gb, 1, _dtype_for(dtype_bytes), fp8)


def deepseek_v3_config(target_gb: float, dtype_bytes: int = 2, fp8: bool = False, num_layers: int | None = None,
                       **overrides):
    """A DeepseekV3Config (hidden 1024, MLA with q-LoRA 256 / kv-LoRA 128, 64 routed experts of 512 in 4 groups,
    top-4 from 2 groups, 1 shared expert, first block dense, vocab 8192) sized to ~target_gb GB; with fp8 the
    size is counted in block-FP8 bytes."""
    import transformers

    kw = dict(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512, num_attention_heads=16,
              num_key_value_heads=16, q_lora_rank=256, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64,
              v_head_dim=64, n_routed_experts=64, num_experts_per_tok=4, n_shared_experts=1,
              first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True, vocab_size=8192,
              max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
              pad_token_id=0)
    kw.update(overrides)

    def make(n):
        return transformers.DeepseekV3Config(num_hidden_layers=n, **kw)

    first = kw["first_k_dense_replace"]
    return make(num_layers) if num_layers else _sized(make, target_gb, first + 1, _dtype_for(dtype_bytes), fp8)


PRESETS = {"qwen3_moe": qwen3_moe_config, "deepseek_v3": deepseek_v3_config}


# ------------------------------------------------------------------------------------------------ checks


def _keys_and_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = tuple(h.get_slice(k).get_shape())
    return out


def tiny_config(model_type: str, tied: bool = False, **overrides):
    """A small config of ``model_type`` with every structural feature (dense first block for DeepSeek-V3,
    q-LoRA, shared experts for Qwen2-MoE / DeepSeek-V3), vocab 8192 for the bundled tokenizer."""
    import transformers

    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=tied,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)
    kw.update({
        "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                          mlp_only_layers=[1]),
        "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          shared_expert_intermediate_size=48, qkv_bias=True),
        "olmoe": dict(num_experts=4, num_experts_per_tok=2),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
        "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                            first_k_dense_replace=1, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16,
                            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_shared_experts=1,
                            num_key_value_heads=4),
    }[model_type])
    kw.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **kw)


def _check_against_save_pretrained(model_type: str, tied: bool = False, log=print) -> dict:
    """Build a tiny real model of ``model_type``, ``save_pretrained`` it, write our checkpoint of the same config
    and compare key sets and shapes (they must be identical)."""
    import transformers

    cfg = tiny_config(model_type, tied=tied)
    with tempfile.TemporaryDirectory(prefix=f"synth_check_{model_type}_") as td:
        td = Path(td)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(td / "hf")
        ours = write_checkpoint(cfg, td / "ours", shard_size="64KB", log=lambda *_: None)
        hf_keys, our_keys = _keys_and_shapes(td / "hf"), _keys_and_shapes(td / "ours")
    only_hf = sorted(set(hf_keys) - set(our_keys))
    only_ours = sorted(set(our_keys) - set(hf_keys))
    mismatched = sorted(k for k in set(hf_keys) & set(our_keys) if hf_keys[k] != our_keys[k])
    res = {"model_type": model_type, "tied": tied, "n_keys_hf": len(hf_keys), "n_keys_ours": len(our_keys),
           "n_shards_ours": ours["n_shards"], "only_in_save_pretrained": only_hf, "only_in_ours": only_ours,
           "shape_mismatch": mismatched, "ok": not (only_hf or only_ours or mismatched)}
    log(f"  save_pretrained key check {model_type}{' (tied)' if tied else ''}: "
        f"{'OK' if res['ok'] else 'MISMATCH'} ({len(hf_keys)} keys vs {len(our_keys)} ours, {ours['n_shards']} "
        f"shards){'' if res['ok'] else f' only_hf={only_hf[:5]} only_ours={only_ours[:5]} shapes={mismatched[:5]}'}")
    return res


def verify_load(path: str | os.PathLike, log=print) -> dict:
    """from_pretrained with no missing/unexpected/mismatched keys, finite logits on a few tokens, and one routed
    expert of block 0 (or the first MoE block) equal to the regenerated values in the right fused slot."""
    import transformers

    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    finite = bool(torch.isfinite(logits).all())
    # the loader fused our per-expert tensors: expert 1's gate and up rows must be what we generated for them
    expert_ok = None
    mt = model.config.model_type
    if mt in CKPT_LAYOUTS and not meta["fp8"]:
        (g, u, d), _ = CKPT_LAYOUTS[mt]
        for li, layer in enumerate(model.model.layers):
            ex = getattr(getattr(layer, "mlp", None), "experts", None)
            if ex is not None and hasattr(ex, "gate_up_proj"):
                pre = _rename(mt, f"model.layers.{li}.mlp.experts.1")
                inter = ex.gate_up_proj.shape[1] // 2
                want_g = normal_fp32(f"{pre}.{g}.weight", (inter, ex.gate_up_proj.shape[2]), meta["seed"], meta["std"])
                want_u = normal_fp32(f"{pre}.{u}.weight", (inter, ex.gate_up_proj.shape[2]), meta["seed"], meta["std"])
                want_d = normal_fp32(f"{pre}.{d}.weight", tuple(ex.down_proj.shape[1:]), meta["seed"], meta["std"])
                sd = DTYPES_BY_NAME[meta["dtype"]]
                expert_ok = (torch.equal(ex.gate_up_proj[1, :inter].to(sd), want_g.to(sd))
                             and torch.equal(ex.gate_up_proj[1, inter:].to(sd), want_u.to(sd))
                             and torch.equal(ex.down_proj[1].to(sd), want_d.to(sd)))
                break
    res = {"path": str(path), "loading_info_problems": problems, "logits_shape": list(logits.shape),
           "logits_finite": finite, "logits_absmax": float(logits.abs().max()), "expert1_values_match": expert_ok,
           "ok": not problems and finite and expert_ok is not False}
    log(f"  load check {path.name}: {'OK' if res['ok'] else 'FAILED'} (loading info problems: {problems or 'none'}; "
        f"logits {tuple(logits.shape)} finite={finite} max|.|={res['logits_absmax']:.3f}; "
        f"expert 1 in the fused slot = regenerated values: {expert_ok})")
    return res


DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def verify_fp8(path: str | os.PathLike, n: int = 8, transformers_check: bool = True, log=print) -> dict:
    """Dequantize ``n`` block-FP8 weights (spread over the checkpoint) and compare with the float32 values
    regenerated from their keys (what existed before the fp8 cast); also check dtypes on disk."""
    from safetensors import safe_open

    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    cfg = json.loads((path / "config.json").read_text())
    wm = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    scaled = sorted(k[: -len("_scale_inv")] for k in wm if k.endswith("_scale_inv"))
    picks = [scaled[round(i * (len(scaled) - 1) / max(1, n - 1))] for i in range(n)] if scaled else []
    rows, dtypes = [], {}
    for k in picks:
        with safe_open(path / wm[k], "pt") as h:
            q, s = h.get_tensor(k), h.get_tensor(k + "_scale_inv")
            dtypes[k] = (h.get_slice(k).get_dtype(), h.get_slice(k + "_scale_inv").get_dtype())
        w = normal_fp32(k, tuple(q.shape), meta["seed"], meta["std"])
        deq = fp8_block_dequantize(q, s)
        rel = float((deq - w).norm() / w.norm())
        rows.append({"key": k, "shape": list(q.shape), "scale_shape": list(s.shape), "rel_err": rel,
                     "max_abs_err": float((deq - w).abs().max()), "w_absmax": float(w.abs().max())})
    high = {}
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight", "model.norm.weight"):
        if k in wm:
            with safe_open(path / wm[k], "pt") as h:
                high[k] = h.get_slice(k).get_dtype()
    bad_dtype = [k for k, (a, b) in dtypes.items() if (a, b) != ("F8_E4M3", "F32")]
    cross = _transformers_fp8_cross_check(path, picks, meta) if transformers_check and picks else None
    worst = max((r["rel_err"] for r in rows), default=float("nan"))
    res = {"path": str(path), "n_fp8_weights": len(scaled), "checked": rows, "worst_rel_err": worst,
           "dtypes_ok": not bad_dtype, "high_precision_dtypes": high,
           "quantization_config": cfg.get("quantization_config"), "transformers_dequantize": cross,
           "ok": (bool(rows) and not bad_dtype and worst < 0.05 and all(v != "F8_E4M3" for v in high.values())
                  and (cross is None or cross.get("ok", True)))}
    log(f"  fp8 check {path.name}: {'OK' if res['ok'] else 'FAILED'} ({len(scaled)} block-FP8 weights; "
        f"{len(rows)} dequantized, worst relative error {worst:.4f}; non-linear tensors {sorted(set(high.values()))})")
    for r in rows:
        log(f"    {r['key']} {tuple(r['shape'])} scale {tuple(r['scale_shape'])}: rel err {r['rel_err']:.4f}")
    if cross is not None:
        log(f"    transformers FineGrainedFP8Config(dequantize=True) load: {cross}")
    return res


def _transformers_fp8_cross_check(path: Path, keys: list[str], meta: dict) -> dict:
    """Independent check of the scale_inv convention: transformers' own FP8 loader (dequantize=True, runs on a
    CPU) must load the checkpoint with no key problems, give finite logits and the same dequantized weights."""
    import transformers

    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, output_loading_info=True, quantization_config=transformers.FineGrainedFP8Config(dequantize=True))
    except Exception as e:  # informational: depends on the transformers version
        return {"loaded": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    problems = {k: v for k, v in info.items() if v}
    with torch.no_grad():
        finite = bool(torch.isfinite(model(torch.tensor([[1, 2, 3, 4, 5]])).logits).all())
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    mt = model.config.model_type
    (g, u, d), _ = CKPT_LAYOUTS.get(mt, (("gate_proj", "up_proj", "down_proj"), ()))
    errs = {}
    for k in keys:  # find the loaded (possibly fused) tensor that holds k
        m = re.match(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$", k)
        if m and m.group(1) + ".gate_up_proj" in sd:
            e, which = int(m.group(2)), m.group(3)
            fused = sd[m.group(1) + ".gate_up_proj"][e] if which in (g, u) else sd[m.group(1) + ".down_proj"][e]
            half = fused.shape[0] // 2
            got = fused[:half] if which == g else fused[half:] if which == u else fused
        elif k in sd:
            got = sd[k]
        else:
            continue
        w = normal_fp32(k, tuple(got.shape), meta["seed"], meta["std"])
        errs[k] = float((got.float() - w).norm() / w.norm())
    worst = max(errs.values(), default=float("nan"))
    return {"loaded": True, "loading_info_problems": problems, "logits_finite": finite, "n_compared": len(errs),
            "worst_rel_err_vs_original": worst, "ok": not problems and finite and bool(errs) and worst < 0.05}


def self_test(work: Path, keep: bool = False, log=print) -> dict:
    """All checks: keys vs save_pretrained (five families, plus tied embeddings), load + logits of a ~0.1 GB
    Qwen3-MoE and a tiny Mixtral and DeepSeek-V3 checkpoint, and the block-FP8 DeepSeek-V3 dequantization."""
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"key_checks": []}
    for mt in ("qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe", "olmoe"):
        res["key_checks"].append(_check_against_save_pretrained(mt, log=log))
    res["key_checks"].append(_check_against_save_pretrained("qwen3_moe", tied=True, log=log))
    res["loads"] = []
    small = {"qwen3_moe_0.1gb": (qwen3_moe_config(0.1, num_experts=16), False),
             "mixtral_tiny": (tiny_config("mixtral"), False),
             "deepseek_v3_tiny": (tiny_config("deepseek_v3"), False),
             "deepseek_v3_fp8_0.1gb": (deepseek_v3_config(0.1, fp8=True, n_routed_experts=16), True)}
    for name, (cfg, fp8) in small.items():
        s = write_checkpoint(cfg, work / name, fp8=fp8, shard_size="32MB", overwrite=True, log=lambda *_: None)
        log(f"  wrote {name}: {s['total_gb']:.3f} GB, {s['n_tensors']} tensors, {s['layers']} layers, "
            f"{s['n_shards']} shards, {s['seconds']:.1f} s")
        if fp8:
            res["fp8"] = verify_fp8(work / name, log=log)
        else:
            res["loads"].append(verify_load(work / name, log=log))
    if not keep:
        for name in small:
            shutil.rmtree(work / name, ignore_errors=True)
    res["ok"] = (all(c["ok"] for c in res["key_checks"]) and all(r["ok"] for r in res["loads"])
                 and res["fp8"]["ok"])
    log(f"self-test: {'ALL OK' if res['ok'] else 'FAILURES'}")
    return res


# ------------------------------------------------------------------------------------------------ CLI


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(PRESETS), default="qwen3_moe")
    ap.add_argument("--size-gb", type=float, help="target checkpoint size in GB (1e9 bytes); sets the layer count")
    ap.add_argument("--layers", type=int, help="exact number of decoder layers (instead of --size-gb)")
    ap.add_argument("--num-experts", type=int, help="routed experts per layer (default: the preset's 64)")
    ap.add_argument("--out", help="output folder (refused if it exists, unless --overwrite)")
    ap.add_argument("--fp8", action="store_true", help="block-FP8 (e4m3, 128x128 scale_inv) decoder linears")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--shard-size", default="1GB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--verify", action="store_true",
                    help="after writing: from_pretrained + finite logits (bf16), or the FP8 dequantization check")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for generation (default 1)")
    ap.add_argument("--self-test", action="store_true", help="run every check in a temporary folder and exit")
    ap.add_argument("--plan-only", action="store_true",
                    help="print the planned checkpoint (layers, bytes, tensors, shards) as JSON and exit")
    ap.add_argument("--json", help="also write the summary (or self-test result) to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.self_test:
        with tempfile.TemporaryDirectory(prefix="synthetic_ckpt_selftest_") as td:
            res = self_test(Path(td))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, default=str))
        return 0 if res["ok"] else 1

    if (not args.out and not args.plan_only) or (args.size_gb is None and args.layers is None):
        ap.error("--out and one of --size-gb / --layers are required (or --self-test)")
    dtype = DTYPES[args.dtype]
    overrides = {}
    if args.num_experts:
        overrides["num_experts" if args.arch == "qwen3_moe" else "n_routed_experts"] = args.num_experts
    cfg = PRESETS[args.arch](args.size_gb or 0, dtype_bytes=dtype.itemsize,
                             fp8=args.fp8, num_layers=args.layers, **overrides)
    if args.plan_only:
        entries = plan_tensors(cfg, dtype, args.fp8)
        print(json.dumps({"arch": args.arch, "target_gb": args.size_gb, "layers": cfg.num_hidden_layers,
                          "total_size": sum(e.nbytes for e in entries), "n_tensors": len(entries),
                          "n_shards": len(plan_shards(entries, parse_size(args.shard_size))),
                          "dtype": DTYPE_NAMES[dtype], "fp8": args.fp8}))
        return 0
    rss0 = peak_rss_bytes()
    try:
        s = write_checkpoint(cfg, args.out, dtype=dtype, fp8=args.fp8, std=args.std, seed=args.seed,
                             shard_size=args.shard_size, overwrite=args.overwrite,
                             extra_meta={"arch": args.arch, "target_gb": args.size_gb})
    except (FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s['out']}: {s['total_gb']:.3f} GB ({s['total_size']} bytes), {s['n_tensors']} tensors, "
          f"{s['layers']} layers, {s['n_shards']} shards, {s['seconds']:.1f} s "
          f"({s['total_gb'] / max(s['seconds'], 1e-9):.2f} GB/s); writer peak RSS {s['peak_rss_bytes'] / GB:.3f} GB "
          f"(after imports and sizing: {rss0 / GB:.3f} GB)")
    if args.verify:
        s["verify"] = verify_fp8(args.out) if args.fp8 else verify_load(args.out)
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2, default=str))
    return 0 if s.get("verify", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
