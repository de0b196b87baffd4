"""``moeq check-serving`` and ``moeq export`` (argv is parsed by moeq.cli).

``moeq check-serving DIR --engine vllm[,sglang,transformers] [--tp N]`` prints every violation with the module
and the setting that fixes it, and exits 1 on any; ``moeq quantize`` runs the same check on its output
and puts a one-line summary per engine in its notes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .engines import ENGINES, Violation, resolve_schemes, violations


def check_export(path: str | Path, engines, tp: int = 1, trust_remote_code: bool = False) -> dict[str, list[Violation]]:
    """{engine: violations} of the compressed-tensors checkpoint in ``path`` (config and shard headers only)."""
    import torch

    from ..allocate.modules import inventory
    from ..models.lazy import CheckpointSource
    from ..models.loading import open_checkpoint

    info = open_checkpoint(str(path), trust_remote_code)
    qc = getattr(info.config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else (qc or {})
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path} is not a compressed-tensors checkpoint (its config.json has no compressed-tensors "
                         "quantization_config); check-serving validates what `moeq quantize` writes")
    adapter = CheckpointSource(info.path, info.config, torch.float32, info.storage_dtype, "cpu",
                               trust_remote_code).adapter
    records = [replace(r, name=adapter.checkpoint_name(r.name)) for r in inventory(adapter)]
    schemes = resolve_schemes(qc, [r.name for r in records])
    hidden = getattr(adapter.config, "hidden_size", None)
    return {e: violations(ENGINES[e], records, schemes, tp, hidden) for e in engines}


def summary(found: dict[str, list[Violation]], out: str) -> list[str]:
    """One note per engine with violations (for ``moeq quantize``)."""
    return [f"{e} would not serve this export as written: {len(v)} violations, e.g. {v[0].line()} "
            f"(`moeq check-serving {out} --engine {e}` lists them)" for e, v in found.items() if v]


def add_parsers(sub, add_common) -> None:
    from ..flags import POSITIVE, csv_of, one_of

    c = sub.add_parser("check-serving", help="check an export against vLLM / SGLang / transformers loading rules")
    c.add_argument("model", metavar="DIR", help="a compressed-tensors checkpoint folder (moeq quantize --out)")
    c.add_argument("--engine", type=csv_of(one_of(tuple(ENGINES), "engine"), "engines"), default=tuple(ENGINES),
                   help=f"engines to check, comma-separated: {', '.join(ENGINES)} (default: all)")
    c.add_argument("--tp", type=POSITIVE, default=1, help="tensor-parallel size the engine will run with (default 1)")
    add_common(c)
    from .formats import parse_formats

    x = sub.add_parser("export", help="convert a moeq output to another format (GGUF for llama.cpp)")
    x.add_argument("model", metavar="DIR", help="a moeq quantize output (compressed-tensors)")
    x.add_argument("--format", dest="formats", type=parse_formats, required=True, help="gguf")
    x.add_argument("--out", default=None, help="output file (default DIR/model.gguf)")
    x.add_argument("--gguf-pre", default=None, help="llama.cpp pre-tokenizer name when moeq cannot tell it")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_common(x)


def cmd_export(a) -> int:
    from .gguf import write_gguf

    if a.formats != ("gguf",):
        raise ValueError("moeq export writes --format gguf (the compressed-tensors checkpoint is what it reads)")
    folder = Path(a.model)
    out = Path(a.out) if a.out else folder / "model.gguf"
    if out.exists() and not a.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out}: give a file name ending in .gguf")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: its folder {out.parent} does not exist")
    from ..export.load import is_packed_checkpoint

    if not is_packed_checkpoint(folder):
        raise ValueError(f"{folder} is not a moeq compressed-tensors output (pack-quantized config.json); "
                         "quantize it with `moeq quantize --format gguf` instead")
    info = write_gguf(folder, out, a.gguf_pre)
    print(f"GGUF {info['bytes'] / 2**20:.1f} MiB ({', '.join(f'{n} {t}' for t, n in sorted(info['types'].items()))})"
          f"{'; ' + str(len(info['f32_linears'])) + ' linears as F32 values' if info['f32_linears'] else ''} -> {out}")
    return 0


def cmd_check_serving(a) -> int:
    found = check_export(a.model, a.engine, a.tp, a.trust_remote_code)
    for engine, vs in found.items():
        src = ENGINES[engine].source
        if not vs:
            print(f"{engine}: OK (rules of {src}; --tp {a.tp})")
            continue
        print(f"{engine}: {len(vs)} violations (rules of {src}; --tp {a.tp})")
        for v in vs:
            print(f"  {v.line()}")
    return 1 if any(found.values()) else 0
