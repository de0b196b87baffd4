"""Forward hooks that record what block-wise searches need: module inputs/outputs and input rows.

``Recorder.io`` keeps every call of a module: (args, kwargs, output, c) with c the routing
coefficient of its rows when the module is a routed or shared expert (read from the block's routing
observer, ``ModelAdapter.routing``). ``Recorder.rows`` keeps a linear's input rows (every ``stride``-th)
and their coefficients. Hooks are removed on exit.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..models.moe import RoutingObserver


class Recorder:
    def __init__(self, routing: RoutingObserver | None = None):
        self.routing = routing
        self.calls: dict[str, list[list]] = defaultdict(list)  # key -> [[args, kwargs, out, c], ...]
        self.x: dict[str, list[torch.Tensor]] = defaultdict(list)  # key -> [(r, d), ...]
        self.c: dict[str, list[torch.Tensor | None]] = defaultdict(list)  # key -> [(r,) or None, ...]
        self._handles = []

    def _call(self, name: str | None):
        return self.routing.call(name) if self.routing is not None and name is not None else None

    def io(self, key: str, mod: nn.Module, name: str | None = None) -> None:
        """Record (args, kwargs, output, routing coefficients) of every call of ``mod`` (full name ``name``)."""
        def pre(m, args, kwargs):
            rc = self._call(name)
            self.calls[key].append([args, kwargs, None, None if rc is None else rc.weight.detach()])

        def post(m, args, kwargs, out):
            self.calls[key][-1][2] = (out[0] if isinstance(out, tuple) else out).detach()

        self._handles += [mod.register_forward_pre_hook(pre, with_kwargs=True),
                          mod.register_forward_hook(post, with_kwargs=True)]

    def rows(self, key: str, mod: nn.Module, parent: str | None = None, stride: int = 1) -> None:
        """Record every ``stride``-th input row of ``mod`` and, when its parent (full name) is a routed or
        shared expert, each row's combine coefficient c."""
        def pre(m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])  # (r, d)
            rc = self._call(parent)
            self.x[key].append(x[::stride])
            self.c[key].append(None if rc is None else rc.weight.detach()[::stride])

        self._handles.append(mod.register_forward_pre_hook(pre))

    def rows_of(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All recorded rows (n, d) and coefficients (n,) (None when none were recorded)."""
        xs = self.x.get(key, [])
        if not xs:
            return torch.zeros(0, 0), None
        cs = self.c[key]
        c = torch.cat(cs) if all(t is not None for t in cs) else None
        return torch.cat(xs), c

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
