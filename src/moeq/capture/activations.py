"""The calibration activations between blocks: where they live and how they move to the next block.

After block i, the hidden states of every calibration batch (b, T, H) become block i+1's inputs. They
are kept on the compute device, in CPU memory or on disk (one safetensors file per batch), whichever
the budget allows (``placement="auto"``: the device if they take at most a quarter of its free memory,
else CPU memory under the same rule, else disk), and the choice is logged. The keyword arguments every
block takes (attention mask, rotary position embeddings, ...) are the same for all blocks and are
kept once, on CPU.

Each :meth:`Activations.propagate` writes a new generation and drops the old one, so on disk a run
killed mid-block still has the complete inputs of that block; :meth:`save` / :meth:`load` persist them
for ``--resume``. Values are identical wherever they live.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from ..utils.memory import fmt_bytes, free_bytes
from ..utils.progress import log
from .hooks import capture_first_block_inputs

PLACEMENTS = ("auto", "device", "cpu", "disk")


def choose_placement(nbytes: int, device, requested: str = "auto") -> str:
    if requested not in PLACEMENTS:
        raise ValueError(f"--offload-activations must be one of {', '.join(PLACEMENTS)}, got {requested!r}")
    if requested != "auto":
        return "cpu" if requested == "device" and torch.device(device).type == "cpu" else requested
    if torch.device(device).type != "cpu" and nbytes <= free_bytes(device) // 4:
        return "device"
    return "cpu" if nbytes <= free_bytes("cpu") // 4 else "disk"


class Activations:
    """Hidden states of each calibration batch entering the current block, plus the shared block kwargs."""

    def __init__(self, hidden: list, kwargs: list[dict], placement: str, device, folder: Path | None = None,
                 gen: int = 0):
        self.hidden, self.kwargs = hidden, kwargs  # tensors, or file paths on disk
        self.placement, self.device, self.folder, self.gen = placement, device, folder, gen
        self.nbytes = 0  # of all hidden states
        self.shapes: list[tuple[int, int]] = []  # (b, T) of each batch
        if placement == "disk" and folder is None:
            raise ValueError("disk activations need a folder")

    @classmethod
    def capture(cls, model, first_block, batches: list[torch.Tensor], device, placement: str = "auto",
                folder: Path | None = None, what: str = "calibration") -> "Activations":
        """Inputs of block 0 for each batch of token ids (b, T), placed by the budget (see module docstring)."""
        got = capture_first_block_inputs(model, first_block, batches)  # [(hidden (b, T, H) cpu, kwargs cpu)]
        nbytes = sum(h.numel() * h.element_size() for h, _ in got)
        where = choose_placement(nbytes, device, placement)
        if where == "disk" and folder is None:
            raise ValueError("activations do not fit in memory and this run has no output folder to offload them "
                             "to: pass an --out folder or a smaller --nsamples/--seqlen")
        n, T = sum(h.shape[0] for h, _ in got), got[0][0].shape[1] if got else 0
        log.info("%s activations: %d x %d tokens, %s per block, kept %s", what, n, T, fmt_bytes(nbytes),
                 {"device": f"on {device}", "cpu": "in CPU memory", "disk": f"on disk in {folder}"}[where])
        acts = cls([], [kw for _, kw in got], where, device, folder)
        acts.hidden = [acts._store(k, h) for k, (h, _) in enumerate(got)]
        acts.nbytes, acts.shapes = nbytes, [tuple(h.shape[:2]) for h, _ in got]
        return acts

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def num_tokens(self) -> int:
        return sum(b * t for b, t in self.shapes)

    def _dir(self, gen: int) -> Path:
        return self.folder / f"g{gen}"

    def _store(self, k: int, h: torch.Tensor, gen: int | None = None):
        if self.placement == "disk":
            p = self._dir(self.gen if gen is None else gen) / f"h{k:05d}.safetensors"
            p.parent.mkdir(parents=True, exist_ok=True)
            save_file({"h": h.detach().contiguous().cpu()}, str(p))
            return p
        return h.detach().to(self.device if self.placement == "device" else "cpu")

    def _load(self, h) -> torch.Tensor:
        return load_file(str(h))["h"] if isinstance(h, Path) else h

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        """(hidden (b, T, H), kwargs) per batch; the caller moves them to the compute device."""
        for h, kw in zip(self.hidden, self.kwargs):
            yield self._load(h), kw

    def fork(self, name: str) -> "Activations":
        """A second stream starting from these hidden states (shared, never modified in place); on disk its
        generations go to ``folder/name``."""
        out = Activations(list(self.hidden), self.kwargs, self.placement, self.device,
                          self.folder / name if self.folder is not None else None, self.gen)
        out.nbytes, out.shapes = self.nbytes, self.shapes
        return out

    def propagate(self, fn: Callable[[int, torch.Tensor, dict], torch.Tensor]) -> "Activations":
        """The next block's inputs: ``fn(k, hidden, kwargs)`` per batch k, as a new generation."""
        nxt = Activations([], self.kwargs, self.placement, self.device, self.folder, self.gen + 1)
        nxt.hidden = [nxt._store(k, fn(k, h, kw)) for k, (h, kw) in enumerate(self)]
        nxt.nbytes, nxt.shapes = self.nbytes, self.shapes
        return nxt  # on disk the old generation stays until prune(): a kill now still finds it

    # ------------------------------------------------------------------ persistence for --resume
    def save(self, folder: Path) -> None:
        """Persist hidden states (one file per batch) and kwargs under ``folder/g<gen>``."""
        d = folder / f"g{self.gen}"
        if not (self.placement == "disk" and self.folder == folder):
            d.mkdir(parents=True, exist_ok=True)
            for k, h in enumerate(self.hidden):
                save_file({"h": self._load(h).detach().contiguous().cpu()}, str(d / f"h{k:05d}.safetensors"))
        if not (folder / "kwargs.pt").is_file():
            torch.save(self.kwargs, folder / "kwargs.pt")
            torch.save([list(s) for s in self.shapes], folder / "shapes.pt")

    def prune(self, folder: Path | None = None) -> None:
        """Delete every other generation under ``folder`` (default: the offload folder), once this one is
        what the run state points to."""
        folder = folder or self.folder
        for old in folder.glob("g*") if folder is not None and folder.is_dir() else ():
            if old.is_dir() and old.name != f"g{self.gen}":
                shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, folder: Path, gen: int, placement: str, device) -> "Activations":
        kwargs = torch.load(folder / "kwargs.pt", weights_only=True)
        files = sorted((folder / f"g{gen}").glob("h*.safetensors"))
        if len(files) != len(kwargs):
            raise ValueError(f"{folder}: the saved activations are incomplete; start over with --overwrite")
        acts = cls([], kwargs, placement, device, folder, gen)
        acts.hidden = files if placement == "disk" else [acts._store(k, load_file(str(f))["h"])
                                                         for k, f in enumerate(files)]
        acts.nbytes = sum(f.stat().st_size for f in files)
        acts.shapes = [tuple(kw_shape) for kw_shape in torch.load(folder / "shapes.pt", weights_only=True)]
        return acts
