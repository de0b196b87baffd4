"""Stream a checkpoint to disk part by part: each finished block is on disk as soon as it is done.

While the block loop runs, every part (the embeddings, each block, the final norm and head) is written
to ``parts/<name>.<k>.safetensors`` through a temporary name and a rename, split at tensor boundaries
where it would exceed ``max_shard_size``; nothing of a finished block stays in memory. :meth:`finish`
turns the parts into the checkpoint's shards: consecutive parts smaller than ``MERGE_BYTES`` are packed
together (so small models get one ``model.safetensors``), larger ones stay one shard each; shards are
renamed to transformers' pattern ``model-00001-of-0000N.safetensors`` with
``model.safetensors.index.json`` (the sharding convention of huggingface_hub's
``split_torch_state_dict_into_shards``, which needs the whole state dict at once and so cannot stream).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MERGE_BYTES = 256 << 20  # parts smaller than this are packed together at the end
INDEX = "model.safetensors.index.json"


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _stored_bytes(h, key: str) -> int:
    """Bytes of a tensor in an open safetensors file, from its header (nothing is read)."""
    s = h.get_slice(key)
    n = 1
    for d in s.get_shape():
        n *= int(d)
    return n * _DTYPE_BYTES[s.get_dtype()]


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


class PartWriter:
    """Parts under ``folder/parts``; :meth:`finish` assembles the shards in ``folder``."""

    def __init__(self, folder: Path, max_shard_size: int = 5 * 10**9):
        self.folder, self.max_shard_size = Path(folder), int(max_shard_size)
        self.parts = self.folder / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)

    def files(self, name: str) -> list[Path]:
        return sorted(self.parts.glob(f"{name}.*.safetensors"), key=lambda p: int(p.name.split(".")[-2]))

    def has(self, name: str) -> bool:
        return bool(self.files(name))

    def write(self, name: str, tensors: dict[str, torch.Tensor]) -> int:
        """Write one part (split at ``max_shard_size``); -> its bytes. Rewriting a part replaces it."""
        for old in self.files(name):
            old.unlink()
        chunks, cur, size = [], {}, 0
        for k in sorted(tensors):
            n = _nbytes(tensors[k])
            if cur and size + n > self.max_shard_size:
                chunks.append(cur)
                cur, size = {}, 0
            cur[k], size = tensors[k], size + n
        chunks.append(cur)
        for j, chunk in enumerate(chunks):
            _save(chunk, self.parts / f"{name}.{j}.safetensors")
        return sum(_nbytes(t) for t in tensors.values())

    def drop(self, keep: set[str]) -> None:
        """Delete parts not named in ``keep`` (leftovers of an interrupted block)."""
        for p in self.parts.glob("*.safetensors"):
            if p.name.rsplit(".", 2)[0] not in keep:
                p.unlink()

    def finish(self, order: list[str]) -> dict:
        """Assemble the parts named in ``order`` into shards; -> {"files", "bytes", "total_size"}."""
        files = [f for name in order for f in self.files(name)]
        groups, cur, size, cur_small = [], [], 0, False
        for f in files:
            n = f.stat().st_size
            small = n < MERGE_BYTES
            if cur and (not small or not cur_small or size + n > min(self.max_shard_size, MERGE_BYTES)):
                groups.append(cur)
                cur, size = [], 0
            cur, size, cur_small = cur + [f], size + n, small
        if cur:
            groups.append(cur)
        names = (["model.safetensors"] if len(groups) == 1 else
                 [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))])
        weight_map, total = {}, 0
        for group, name in zip(groups, names):
            if len(group) == 1:
                group[0].replace(self.folder / name)
                with safe_open(str(self.folder / name), "pt") as h:
                    keys = list(h.keys())
                    total += sum(_stored_bytes(h, k) for k in keys)
            else:
                merged = {}
                for f in group:
                    with safe_open(str(f), "pt") as h:
                        merged.update({k: h.get_tensor(k) for k in h.keys()})
                _save(merged, self.folder / name)
                keys, total = list(merged), total + sum(_nbytes(t) for t in merged.values())
                for f in group:
                    f.unlink()
            weight_map.update({k: name for k in keys})
        if len(names) > 1:
            (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                          "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        for leftover in self.parts.glob("*"):
            leftover.unlink()
        self.parts.rmdir()
        return {"files": names, "bytes": sum((self.folder / n).stat().st_size for n in names), "total_size": total}
