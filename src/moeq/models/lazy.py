"""Where the block loop gets its blocks: a model already in memory, or a checkpoint read block by block.

A *block source* gives the loop one decoder block at a time, on the compute device and in the
per-expert view, and takes it back when the loop is done with it; it also gives the modules outside
the blocks (embeddings; final norm and lm_head) when they are needed.

* :class:`ResidentSource` wraps a model that is already in memory (bundled models, the Python API):
  loading a block moves it to the compute device, releasing moves it home.
* :class:`CheckpointSource` builds the model skeleton with every parameter on the meta device
  (accelerate's ``init_empty_weights``; buffers such as rotary frequencies are real and tiny) and fills
  a block's parameters and persistent buffers from the safetensors shards only when the loop reaches it,
  in the compute dtype (:class:`~moeq.models.checkpoint.CheckpointReader`: plain, block-FP8 or
  pack-quantized storage). A released block goes back to the meta device, or, with ``keep``, stays in
  CPU memory (the loop's result is then a whole in-memory model). At no point is a full copy of the model
  held unless every block is kept.

Checkpoint keys come from moeq's module names through the registry's renames (``checkpoint_name``);
experts stored fused (``experts.gate_up_proj`` (E, 2I, H), ``experts.down_proj`` (E, H, I)) are sliced.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..utils.progress import log
from .adapter import ModelAdapter, get_submodule
from .checkpoint import CheckpointReader, CheckpointReadError
from .fp8 import SCALE_SUFFIX


def _set_tensor(root: nn.Module, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Replace parameter or buffer ``name`` (relative to root) by ``t``: a floating parameter in ``dtype``, a
    buffer in the dtype the model gave it (e.g. fp32 routing biases stay fp32)."""
    path, _, leaf = name.rpartition(".")
    mod = get_submodule(root, path) if path else root
    if leaf in mod._parameters:
        old = mod._parameters[leaf]
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad if old is not None else False)
    else:
        old = mod._buffers[leaf]
        mod._buffers[leaf] = t.to(old.dtype) if old is not None and t.is_floating_point() else t


def tensor_names(module: nn.Module) -> list[str]:
    """Parameters and persistent buffers (what a checkpoint stores), relative to ``module``."""
    return list(module.state_dict(keep_vars=True))


def module_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the module's parameters (in ``dtype`` when given), meta or not."""
    return sum(p.numel() * (torch.finfo(dtype).bits // 8 if dtype and p.is_floating_point() else p.element_size())
               for p in module.parameters())


class ResidentSource:
    """Blocks of a model that is already in memory."""

    def __init__(self, model: nn.Module, device="cpu"):
        self.adapter = ModelAdapter.for_model(model)
        self.model, self.device = model, device
        self._home: dict[int, torch.device] = {}

    @property
    def num_blocks(self) -> int:
        return self.adapter.num_blocks

    def load_block(self, i: int) -> nn.Module:
        block = self.adapter.blocks[i]
        self._home[i] = next(block.parameters()).device
        block.to(self.device)
        self.adapter.unfuse_block(i)
        return block

    def release_block(self, i: int, keep: bool = True) -> None:
        self.adapter.blocks[i].to(self._home.pop(i, "cpu"))

    def load_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def release_embeddings(self, keep: bool = True) -> None:
        pass

    def load_head(self) -> tuple[nn.Module, nn.Module]:
        spec = self.adapter.spec
        return get_submodule(self.model, spec.final_norm), get_submodule(self.model, spec.lm_head)

    def release_head(self, keep: bool = True) -> None:
        pass


class CheckpointSource:
    """Blocks of a checkpoint on disk, read when the loop reaches them (see the module docstring)."""

    def __init__(self, path: str, config, dtype: torch.dtype, storage_dtype: torch.dtype, device="cpu",
                 trust_remote_code: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.reader = CheckpointReader(path, config)
        cfg = config
        if getattr(cfg, "quantization_config", None) is not None:  # dequantized on read: the skeleton is plain
            cfg = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.eval()
        self.adapter = ModelAdapter.for_model(self.model).unfuse()  # meta: free
        self.dtype, self.storage_dtype, self.device = dtype, storage_dtype, device
        self.tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        self.kept: set[int] = set()
        self._check_keys()

    @property
    def num_blocks(self) -> int:
        return self.adapter.num_blocks

    def _expected(self) -> list[tuple[str, str, tuple]]:
        """(moeq name, checkpoint key, shape) of every tensor the config implies."""
        spec, out = self.adapter.spec, []
        parts = [(f"{self.adapter.block_name(i)}.", b) for i, b in enumerate(self.adapter.blocks)]
        parts += [("", get_submodule(self.model, spec.embed)), ("", get_submodule(self.model, spec.final_norm))]
        parts += [] if self.tied else [("", get_submodule(self.model, spec.lm_head))]
        names = {id(m): n for n, m in self.model.named_modules()}
        for prefix, mod in parts:
            base = prefix or f"{names[id(mod)]}."
            for n, t in mod.state_dict(keep_vars=True).items():
                out.append((base + n, self.adapter.checkpoint_name(base + n), tuple(t.shape)))
        return out

    def _check_keys(self) -> None:
        """Before any work: every tensor the config implies is there with its shape, and no decoder layer
        beyond the config's is (the model class's ignore patterns, e.g. DeepSeek-V3's MTP layer, excepted)."""
        stored = self.reader.shapes()
        ignore = [re.compile(p) for p in getattr(type(self.model), "_keys_to_ignore_on_load_unexpected", None) or []]
        missing, wrong, used = [], [], set()
        for full, key, shape in self._expected():
            if key in stored:
                used.update({key, key + SCALE_SUFFIX})
                if stored[key] != shape:
                    wrong.append(f"{key} {list(stored[key])} (config: {list(shape)})")
            elif key.endswith(".weight") and self.reader.has_weight(key[:-7]):
                used.update(k for k in stored if k.startswith(key[:-6] + "weight_"))  # packed parts
            elif (fused := self._fused_slice(full)) is not None and fused[0] in stored:
                used.add(fused[0])
            else:
                missing.append(key)
        if missing or wrong:
            what = (f"{len(missing)} tensors its config implies are missing (e.g. {', '.join(missing[:3])})" if missing
                    else f"{len(wrong)} tensors have other shapes than its config says (e.g. {'; '.join(wrong[:2])})")
            raise CheckpointReadError(f"{self.reader.path}: {what}; the config does not belong to these weights or "
                                      "the download is incomplete")
        extra = [k for k in stored if k not in used and not any(r.match(k) for r in ignore)]
        beyond = f"{self.adapter.checkpoint_name(self.adapter.block_name(self.num_blocks))}."
        if any(k.startswith(beyond) for k in extra):
            raise CheckpointReadError(f"{self.reader.path}: the weights hold more layers than the {self.num_blocks} "
                                      "its config.json describes; the config does not belong to these weights")
        if extra:
            log.warning("%s: %d stored tensors are not part of the model and are ignored (e.g. %s)",
                        self.reader.path, len(extra), ", ".join(extra[:3]))

    # ------------------------------------------------------------------ reading
    def _fused_slice(self, full: str) -> tuple[str, tuple] | None:
        """(stored fused key, index) for an expert weight stored in transformers' fused layout:
        gate = gate_up_proj[e, :I], up = gate_up_proj[e, I:], down = down_proj[e]."""
        moe = self.adapter.spec.moe
        if moe is None or moe.layout != "fused" or f".{moe.experts}." not in full:
            return None
        block, _, rest = full.partition(f".{moe.experts}.")
        e, proj = int(rest.split(".")[0]), rest.split(".")[1]
        base = self.adapter.checkpoint_name(f"{block}.{moe.experts}")
        g, u, d = moe.proj_names
        if proj == d:
            return f"{base}.down_proj", (e,)
        inter = getattr(self.adapter.experts(int(block.rpartition(".")[2]))[e], g).out_features
        return f"{base}.gate_up_proj", (e, slice(0, inter) if proj == g else slice(inter, 2 * inter))

    def _fill(self, root: nn.Module, prefix: str, names: list[str], key_of=None) -> None:
        keys, slices = {}, {}
        for n in names:
            full = f"{prefix}{n}"
            key = key_of(full) if key_of else self.adapter.checkpoint_name(full)
            if key not in self.reader and not (key.endswith(".weight") and self.reader.has_weight(key[:-7])):
                fused = self._fused_slice(full)
                if fused is not None and fused[0] in self.reader:
                    slices[key] = fused
            keys[n] = key
        got = self.reader.read(list(keys.values()), None, self.device, self.storage_dtype, slices)
        for n, key in keys.items():
            _set_tensor(root, n, got.pop(key), self.dtype)

    def _empty(self, root: nn.Module, names: list[str]) -> None:
        state = root.state_dict(keep_vars=True)
        for n in names:
            t = state[n]
            _set_tensor(root, n, torch.empty(t.shape, dtype=t.dtype, device="meta"))

    def load_block(self, i: int) -> nn.Module:
        block = self.adapter.blocks[i]
        if i in self.kept:
            self.adapter.unfuse_block(i)
            return block.to(self.device)
        self._fill(block, f"{self.adapter.block_name(i)}.", tensor_names(block))
        return block

    def release_block(self, i: int, keep: bool = False) -> None:
        block = self.adapter.blocks[i]
        if keep:
            block.to("cpu")
            self.kept.add(i)
        else:
            self._empty(block, tensor_names(block))
            self.kept.discard(i)

    def load_embeddings(self) -> nn.Module:
        emb = self.model.get_input_embeddings()
        if emb.weight.is_meta:
            self._fill(self.model, "", [f"{self.adapter.spec.embed}.weight"])
        return self.model.get_input_embeddings()

    def release_embeddings(self, keep: bool = False) -> None:
        if not keep:
            self._empty(self.model, [f"{self.adapter.spec.embed}.weight"])

    def load_head(self) -> tuple[nn.Module, nn.Module]:
        spec = self.adapter.spec
        norm, head = get_submodule(self.model, spec.final_norm), get_submodule(self.model, spec.lm_head)
        if not head.weight.is_meta:
            return norm, head
        names = [n for n in tensor_names(self.model) if n.startswith(f"{spec.final_norm}.")]
        self._fill(self.model, "", names)
        if self.tied:  # the head reads the embedding matrix (its own copy: a rotation may untie them)
            self._fill(head, "", ["weight"], key_of=lambda _: self.adapter.checkpoint_name(f"{spec.embed}.weight"))
        else:
            self._fill(self.model, "", [f"{spec.lm_head}.weight"] + (
                [f"{spec.lm_head}.bias"] if getattr(head, "bias", None) is not None else []))
        return norm, head

    def load_all(self) -> nn.Module:
        """Every tensor, kept: the whole model in CPU memory, in its own expert layout."""
        device, self.device = self.device, "cpu"
        try:
            self.load_embeddings()
            for i in range(self.num_blocks):
                self.load_block(i)
                self.kept.add(i)
            self.load_head()
        finally:
            self.device = device
        self.adapter.refuse()
        return self.model

    def release_head(self, keep: bool = False) -> None:
        if keep:
            return
        spec = self.adapter.spec
        norm, head = get_submodule(self.model, spec.final_norm), get_submodule(self.model, spec.lm_head)
        self._empty(norm, tensor_names(norm))
        self._empty(head, tensor_names(head))
