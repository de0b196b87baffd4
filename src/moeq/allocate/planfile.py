"""Bit plans on disk: YAML (``.yaml``/``.yml``) or JSON (``.json``), read back into a BitPlan.

The file is what ``moeq plan`` writes and ``moeq quantize --plan`` reads; it can also be written by
hand. Layout (everything but ``default`` is optional)::

    format: moeq-bitplan
    version: 1
    default: {num_bits: 2, group_size: 128, symmetric: true}
    rules:                      # (regex on the full module name, scheme) tried in order
      - ['model\\.layers\\.\\d+\\.self_attn\\..*', 4]
    overrides:                  # exact module names; win over rules
      model.layers.0.mlp.experts.3.down_proj: 4
      model.layers.3.mlp.shared_expert.up_proj: {num_bits: 8}
      model.layers.1.self_attn.q_proj: null    # keep in full precision
    summary: {...}              # written by moeq for people; ignored on load
    provenance: {...}

A scheme is an integer (bits; group size and symmetry from ``default``), a mapping with any of
``num_bits``/``group_size``/``symmetric`` (missing fields from ``default``) or null (full precision).
Files are written atomically.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import yaml

from ..config import BitPlan
from ..quant.primitives import QuantArgs
from ..utils.fs import write_atomic

PLAN_FORMAT = "moeq-bitplan"
SUFFIXES = (".yaml", ".yml", ".json")


def plan_format(path: Path) -> str:
    if path.suffix not in SUFFIXES:
        raise ValueError(f"a plan file must end in {', '.join(SUFFIXES)}, got {path.name!r}; e.g. --out plan.yaml")
    return "json" if path.suffix == ".json" else "yaml"


def _scheme_out(a: QuantArgs | None, default: QuantArgs):
    if a is None:
        return None
    if replace(a, num_bits=default.num_bits) == default:  # only the width differs
        return a.num_bits
    return a.to_dict()


def plan_to_dict(plan: BitPlan, meta: dict | None = None) -> dict:
    d = {"format": PLAN_FORMAT, "version": 1, **(meta or {}), "default": plan.default.to_dict()}
    if plan.rules:
        d["rules"] = [[p, _scheme_out(a, plan.default)] for p, a in plan.rules]
    d["overrides"] = {n: _scheme_out(a, plan.default) for n, a in plan.overrides.items()}
    return d


def save_plan(plan: BitPlan, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``plan`` (plus ``meta`` keys such as summary/provenance) to a .yaml/.yml/.json file."""
    p = Path(path).expanduser()
    d = plan_to_dict(plan, meta)
    if plan_format(p) == "json":
        text = json.dumps(d, indent=2) + "\n"
    else:
        text = yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=120)
    write_atomic(p, text)
    return p


def _scheme_in(v, default: QuantArgs, where: str) -> QuantArgs | None:
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValueError(f"{where}: a scheme is bits, a mapping or null, got {v!r}")
    if isinstance(v, int):
        return replace(default, num_bits=v)
    if isinstance(v, dict):
        keys = ("num_bits", "group_size", "symmetric", "superblock", "ggml", "full_range")
        unknown = set(v) - set(keys)
        if unknown:
            raise ValueError(f"{where}: unknown scheme keys {sorted(unknown)}; use {', '.join(keys)}")
        return replace(default, **{k: bool(x) if k in keys[2:] else x for k, x in v.items()})
    raise ValueError(f"{where}: a scheme is bits (e.g. 4), a mapping like {{num_bits: 4}} or null, got {v!r}")


def plan_from_dict(d: dict, where: str = "plan") -> BitPlan:
    if not isinstance(d, dict):
        raise ValueError(f"{where} is not a mapping; see `moeq plan --help` for the plan file layout")
    if d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
        raise ValueError(f"{where} has format {d.get('format')!r}, expected {PLAN_FORMAT!r}")
    if "default" not in d:
        raise ValueError(f"{where} has no 'default' scheme; add e.g. default: {{num_bits: 4, group_size: 128}}")
    base = QuantArgs()
    default = _scheme_in(d["default"], base, f"{where} default")
    if default is None:
        raise ValueError(f"{where}: the default scheme cannot be null (name full-precision modules in overrides)")
    rules = []
    for k, item in enumerate(d.get("rules") or []):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"{where} rule {k}: expected [regex, scheme], got {item!r}")
        try:
            re.compile(item[0])
        except re.error as e:
            raise ValueError(f"{where} rule {k}: bad regex {item[0]!r} ({e})") from None
        rules.append((item[0], _scheme_in(item[1], default, f"{where} rule {k}")))
    overrides = {str(n): _scheme_in(v, default, f"{where} override {n}") for n, v in (d.get("overrides") or {}).items()}
    return BitPlan(default=default, rules=rules, overrides=overrides)


def load_plan(path: str | Path) -> BitPlan:
    """Read a plan file written by ``moeq plan`` or by hand."""
    p = Path(path).expanduser()
    kind = plan_format(p)
    if not p.is_file():
        raise ValueError(f"plan file {p} does not exist; make one with `moeq plan MODEL --out {p.name}`")
    try:
        d = json.loads(p.read_text()) if kind == "json" else yaml.safe_load(p.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"cannot parse plan file {p}: {e}") from None
    return plan_from_dict(d, str(p))
