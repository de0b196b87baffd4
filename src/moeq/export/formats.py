"""What ``moeq quantize --format`` writes: compressed-tensors (the streamed shards) and/or GGUF from them.

The block loop always streams the compressed-tensors shards (they are what evaluation and resume read);
GGUF is converted from them at the end (:mod:`.gguf`, moeq's integers as they are), and with
``--format gguf`` alone the shards are removed once the report is complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

FORMATS = ("compressed-tensors", "gguf")
log = logging.getLogger("moeq")


def parse_formats(s: str) -> tuple[str, ...]:
    """--format: a comma-separated subset of FORMATS."""
    from ..flags import csv_of, one_of

    return csv_of(one_of(FORMATS, "format"), "formats (e.g. compressed-tensors,gguf)")(s)


def ggml_grid(a):
    """The scheme a run writing GGUF quantizes with: 8-bit symmetric grids drop -128 (ggml's Q8_0 holds
    [-127, 127]; its int8 dot products assume no -128) and asymmetric grids of <= 4 bits keep 7-bit scales
    (so they are exact Q4_1 blocks); everything else unchanged."""
    from dataclasses import replace

    wanted = not a.superblock and ((a.symmetric and a.num_bits == 8) or (not a.symmetric and a.num_bits <= 4))
    return replace(a, ggml=True) if wanted and not a.ggml else a


def check_formats(formats, info, pre: str | None, plan: dict) -> None:
    """Before any work: compressed-tensors can hold every grid of the resolved ``plan`` ({linear: QuantArgs or
    None}), and the model's architecture and tokenizer can be written as GGUF."""
    kmin = next((n for n, a in plan.items() if a is not None and a.float_zero), None)
    if "compressed-tensors" in formats and kmin is not None:
        raise ValueError(f"{kmin} is on a K-quant float-minimum grid (--kquant-scales --asym: llama.cpp's Q2_K/Q4_K/"
                         "Q5_K), whose float zero points compressed-tensors cannot store; pass --format gguf")
    if "gguf" not in formats:
        return
    from ..models.registry import get_spec
    from .gguf import check_tokenizer
    from .gguf_arch import gguf_arch

    gguf_arch(get_spec(info.config.model_type).name, info.config.to_dict())
    check_tokenizer(Path(info.path), pre)


def finish_formats(folder: Path, formats, out: str, notes: list[str], widened: int, stored_bits: float,
                   pre: str | None, trust_remote_code: bool) -> dict:
    """After the compressed-tensors shards and config are written: the serving check of them (when kept),
    the storage note, the GGUF file. -> report entries ("serving", "gguf")."""
    from .commands import check_export, summary
    from .engines import ENGINES

    rep: dict = {}
    if "compressed-tensors" in formats:
        found = check_export(folder, ENGINES, 1, trust_remote_code)  # moeq check-serving, --tp 1
        rep["serving"] = {e: [v.line() for v in vs] for e, vs in found.items()}
        for line in summary(found, out):
            log.warning(line)
            notes.append(line)
        if widened:
            notes.append(f"{widened} linears are stored in a wider scheme than their grid (same weights, exactly): "
                         "compressed-tensors loaders read one scheme per fused unit (transformers: all routed experts;"
                         f" vLLM: a layer's experts, fused q/k/v, gate/up), so the checkpoint averages {stored_bits:.2f}"
                         " stored bits per quantized weight; `moeq plan` keeps one width per unit by default")
    if "gguf" in formats:
        from .gguf import write_gguf

        rep["gguf"] = write_gguf(folder, folder / "model.gguf", pre)
        if rep["gguf"]["f32_linears"]:
            notes.append(f"GGUF: {len(rep['gguf']['f32_linears'])} linears written as F32 values (their grid is no "
                         f"ggml block type: group size not a multiple of 32, wider asymmetric grids, or 8-bit "
                         f"integers using -128), e.g. {rep['gguf']['f32_linears'][0]}")
    return rep


def drop_compressed_tensors(folder: Path) -> None:
    """Remove the safetensors shards and their index (a GGUF-only output keeps config, tokenizer, report)."""
    for p in list(folder.glob("*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        if p.name != "transforms.safetensors":
            p.unlink()
    cfg = folder / "config.json"
    if cfg.is_file():
        d = json.loads(cfg.read_text())
        d.pop("quantization_config", None)  # the config now describes the FP architecture only
        cfg.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
