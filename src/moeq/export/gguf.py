"""GGUF (llama.cpp) from a moeq checkpoint: moeq's own integers, no re-quantization by llama.cpp.

:func:`write_gguf` reads a ``pack-quantized`` output of ``moeq quantize`` tensor by tensor (the shards'
headers, then one layer's tensors at a time), maps every quantized linear onto the ggml block type that
holds its grid exactly (:mod:`.gguf_quant`), stacks each layer's experts into llama.cpp's 3-D
``ffn_{gate,up,down}_exps`` tensors (one type per stacked tensor: the narrowest all its experts fit),
applies the architecture's tensor rewrites (:mod:`.gguf_arch`), and writes hyper-parameters, the
tokenizer (byte-level BPE as ``gpt2``) and the tensors with the ``gguf`` package (tensors spooled to a
temporary file as they are added, so memory stays about one layer). Unquantized 2-D tensors keep their
bf16 values (BF16), norms, biases and routers are F32. The file is written under a temporary name and
renamed into place.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from .gguf_arch import deinterleave_rope, gguf_arch, rope_permute, write_hparams
from .gguf_quant import GRIDS, choose_any, grid_from, kgrid_from, kmgrid_from, pack_any, pack_stack


def check_tokenizer(folder: Path, pre: str | None) -> tuple[dict, str]:
    """(tokenizer.json, llama.cpp pre-tokenizer name) or a clear error: byte-level BPE only; the pre-tokenizer
    is "gpt-2" for GPT-2's own regex, otherwise ``pre`` must name it."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no tokenizer.json; GGUF needs the tokenizer (moeq quantize writes it)")
    tok = json.loads(path.read_text())
    model, pt = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export handles byte-level BPE tokenizers; this one is {model.get('type')!r}: "
                         "export compressed-tensors")
    if pre is None:
        if pt.get("type") == "ByteLevel" and pt.get("use_regex", True) and tok.get("normalizer") is None:
            pre = "gpt-2"
        else:
            raise ValueError("cannot tell which llama.cpp pre-tokenizer matches this tokenizer's "
                             f"{pt.get('type', 'pre-tokenizer')}; name it with --gguf-pre (e.g. qwen2, deepseek-v3)")
    return tok, pre


def _tokenizer(w, folder: Path, cfg: dict, pre: str | None) -> None:
    """Byte-level BPE tokenizer.json -> tokenizer.ggml.* (model gpt2)."""
    import gguf

    tok, pre = check_tokenizer(folder, pre)
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    model = tok["model"]
    vocab = dict(model["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    vocab.update({t: a["id"] for t, a in added.items()})
    id2tok = {i: t for t, i in vocab.items()}
    n = max(cfg.get("vocab_size", 0), max(vocab.values()) + 1)
    tokens = [id2tok.get(i, f"[PAD{i}]") for i in range(n)]
    types = [gguf.TokenType.UNUSED if i not in id2tok else
             (gguf.TokenType.CONTROL if added[id2tok[i]].get("special") else gguf.TokenType.USER_DEFINED)
             if id2tok[i] in added else gguf.TokenType.NORMAL for i in range(n)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("pad_token", w.add_pad_token_id), ("unk_token", w.add_unk_token_id)):
        s = tcfg.get(key)
        s = s.get("content") if isinstance(s, dict) else s
        i = vocab.get(s) if isinstance(s, str) else cfg.get(f"{key}_id")
        if isinstance(i, int):
            add(i)
    w.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    w.add_add_eos_token(bool(tcfg.get("add_eos_token", False)))


class _Source:
    """A moeq output: its tensors under moeq's module names, linears as grids (:mod:`.gguf_quant`) or float values."""

    def __init__(self, folder: Path):
        import torch

        from ..models.checkpoint import CheckpointReader
        from ..models.lazy import CheckpointSource
        from ..models.loading import open_checkpoint

        info = open_checkpoint(str(folder))
        self.info, self.torch = info, torch
        self.reader = CheckpointReader(folder, info.config)
        self.adapter = CheckpointSource(info.path, info.config, torch.float32, info.storage_dtype, "cpu").adapter
        self.moeq_name = {self.adapter.checkpoint_name(li.name): li.name for li in self.adapter.linears()}
        ad, moe = self.adapter, self.adapter.spec.moe
        # from the registry: routers (kept F32) and sigmoid shared-expert gates, by moeq module name
        self.routers = {f"{ad.block_name(i)}.{moe.router}" for i in ad.moe_blocks()} if moe else set()
        self.shared_gates = {f"{ad.block_name(i)}.{moe.shared_gate}" for i in ad.moe_blocks()
                             if ad.shared_gate(i) is not None}

    def keys(self) -> list[str]:
        return list(self.reader.where)

    def linear(self, ckpt_module: str):
        """A linear's grid (packed), or its float values (kept in full precision, or not on 32-blocks)."""
        parts = self.reader.packed_parts(ckpt_module)
        if parts is None:
            return self.tensor(f"{ckpt_module}.weight")
        q, scale, zero, args = self.reader.grid(ckpt_module, list(self.reader.read(parts).values()))
        q, scale, zero = q.numpy(), scale.numpy(), zero.numpy()
        g = kmgrid_from(q, scale, zero, args) or grid_from(q, scale, zero) or kgrid_from(q, scale, zero)
        if g is None:
            from ..quant.primitives import dequantize

            return dequantize(q, scale, zero, self.reader._scheme(ckpt_module)).numpy()
        return g

    def tensor(self, key: str) -> np.ndarray:
        t = self.reader.read([key])[key]
        return t.float().numpy() if t.is_floating_point() else t.numpy()

    def is_bf16(self, key: str) -> bool:
        """From the shard's header (nothing is read)."""
        from safetensors import safe_open

        with safe_open(str(self.reader.where[key]), "pt") as h:
            return h.get_slice(key).get_dtype() == "BF16"


def _layer_of(name: str) -> int:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def write_gguf(folder: str | Path, out: str | Path, pre: str | None = None) -> dict:
    """Write ``out`` (.gguf) from the moeq checkpoint in ``folder``; -> {"types": {ggml type: tensors},
    "f32_linears": [...], "bytes": size}. Written to a hidden temporary file, renamed into place when complete."""
    folder, out = Path(folder), Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        return _write(folder, out, tmp, pre)
    finally:
        tmp.unlink(missing_ok=True)  # an interrupted or failed write leaves nothing behind


def _write(folder: Path, out: Path, tmp: Path, pre: str | None) -> dict:
    import gguf

    src = _Source(folder)
    cfg = json.loads((folder / "config.json").read_text())
    spec = src.adapter.spec
    a = gguf_arch(spec.name, cfg)
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[a.arch], use_temp_file=True)
    w.add_name(cfg.get("_name_or_path") or folder.name)
    write_hparams(w, a, cfg)
    _tokenizer(w, folder, cfg, pre)
    tmap = gguf.get_tensor_name_map(a.arch, cfg["num_hidden_layers"])
    types: Counter = Counter()
    fallbacks: list[str] = []

    def put(hf_name: str, value, router: bool = False) -> None:
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"llama.cpp's {gguf.MODEL_ARCH_NAMES[a.arch]} has no tensor for {hf_name}")
        if isinstance(value, list):  # stacked experts (or DeepSeek's per-head v_b)
            t = choose_any(value)
            if t != "F32":
                raw, gt = pack_stack(value, t)
                w.add_tensor(gname, raw, raw_dtype=gt)
                types[gt.name] += 1
                return
            if any(isinstance(v, GRIDS) for v in value):
                fallbacks.append(gname)
            value = np.stack([v.values() if isinstance(v, GRIDS) else v for v in value])
        elif isinstance(value, GRIDS):
            t = choose_any([value])
            raw, gt = pack_any(value, t)
            w.add_tensor(gname, raw, raw_dtype=gt)
            types[gt.name] += 1
            if t == "F32":
                fallbacks.append(gname)
            return
        value = np.asarray(value, dtype=np.float32)
        if value.ndim >= 2 and not router and bf16.get(hf_name, False):
            w.add_tensor(gname, _bf16(value), raw_shape=value.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
            types["BF16"] += 1
        else:
            w.add_tensor(gname, value)
            types["F32"] += 1

    names = sorted(src.keys(), key=lambda k: (_layer_of(k) if ".layers." in k else (-1 if "embed" in k else 10**9), k))
    bf16: dict[str, bool] = {}
    layer, pending = None, {}
    for key in names + [None]:
        lay = _layer_of(key) if key is not None else None
        if pending and lay != layer:
            _flush(pending, put, a, cfg, src)
            pending = {}
        layer = lay
        if key is None:
            break
        module, _, leaf = key.rpartition(".")
        if leaf in ("weight_scale", "weight_shape", "weight_zero_point") or key.endswith("rotary_emb.inv_freq"):
            continue
        if module in src.moeq_name and leaf in ("weight_packed", "weight"):
            pending[(src.moeq_name[module], "weight")] = ("linear", module)
        else:
            name = key
            for old, new in a.renames:
                name = name.replace(old, new)
            bf16[name] = src.is_bf16(key) if key.endswith(".weight") else False
            pending[(name, None)] = ("tensor", key)
    tied = cfg.get("tie_word_embeddings", False) or not any(k.startswith(spec.lm_head) for k in names)
    if tied and a.output_required:
        key = f"{spec.embed}.weight"
        bf16[f"{spec.lm_head}.weight"] = src.is_bf16(key)
        put(f"{spec.lm_head}.weight", src.tensor(key))
    w.add_file_type(_file_type(types))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return {"types": dict(types), "f32_linears": fallbacks, "bytes": out.stat().st_size}


def _bf16(x: np.ndarray) -> np.ndarray:
    """fp32 values that are bf16 numbers -> their bf16 bit patterns (uint16), exactly."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _file_type(types: Counter):
    import gguf

    ft = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q3_K": gguf.LlamaFileType.MOSTLY_Q3_K_M,
          "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K, "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K,
          "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M, "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_M,
          "BF16": gguf.LlamaFileType.MOSTLY_BF16}
    quant = [(n, t) for t, n in types.items() if t in ft and t != "BF16"]
    return ft[max(quant)[1]] if quant else gguf.LlamaFileType.ALL_F32


def _flush(pending: dict, put, a, cfg: dict, src: _Source) -> None:
    """Write one layer's (or the embeddings'/head's) tensors: experts stacked, architecture rewrites applied."""
    experts: dict[str, dict[int, object]] = {}
    values: dict[str, object] = {}
    for (name, _), (kind, key) in pending.items():
        if kind == "linear":
            m = re.match(r"(.*\.experts)\.(\d+)\.(\w+)$", name)
            v = src.linear(key)
            if m:
                experts.setdefault(f"{m.group(1)}.{m.group(3)}.weight", {})[int(m.group(2))] = v
            else:
                values[f"{name}.weight"] = v
        else:
            values[name] = src.tensor(key)
    for name in list(values):
        values[name] = _rewrite(name, values[name], a, cfg, values, src)
    for name, v in values.items():
        if v is not None:
            put(name, v, router=name.rpartition(".")[0].removesuffix(".e_score_correction") in src.routers)
    for name, per in experts.items():
        put(name, [per[e] for e in sorted(per)])


def _rows(v, fn):
    return v.rows(fn) if isinstance(v, GRIDS) else fn(v)


def _rewrite(name: str, v, a, cfg: dict, values: dict, src: _Source):
    """The architecture's tensor rewrites (see :mod:`.gguf_arch`); None drops the tensor (replaced by others)."""
    nh = cfg["num_attention_heads"]
    if a.permute_qk and re.search(r"self_attn\.(q|k)_proj\.(weight|bias)$", name):
        n = nh if ".q_proj." in name else (cfg.get("num_key_value_heads") or nh)
        return _rows(v, rope_permute(n))
    if a.vector_shared_gate and name.removesuffix(".weight") in src.shared_gates:
        return np.asarray(v).reshape(-1)  # llama.cpp: a 1-D {n_embd} gate
    if a.mla:
        nope, rope, vhd, kvr = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
        if not cfg.get("rope_interleave", True):
            if re.search(r"self_attn\.q_(b_)?proj\.weight$", name):
                return _rows(v, deinterleave_rope(nh, nope + rope, nope, rope))
            if name.endswith("kv_a_proj_with_mqa.weight"):
                return _rows(v, deinterleave_rope(1, kvr + rope, kvr, rope))
        if name.endswith("kv_b_proj.weight"):
            head = lambda x: x.reshape(nh, nope + vhd, *x.shape[1:])  # noqa: E731
            base = name[: -len("kv_b_proj.weight")]
            # v_b (nh, v, kvr): rows of kv_b, blocks kept (stacked per head); k_b (nh, kvr, nope): a transpose
            values[base + "v_b_proj.weight"] = [_rows(v, lambda x, h=h: head(x)[h, nope:]) for h in range(nh)]
            dense = v.values() if isinstance(v, GRIDS) else np.asarray(v)
            values[base + "k_b_proj.weight"] = np.ascontiguousarray(head(dense)[:, :nope].transpose(0, 2, 1))
            return None
    return v
