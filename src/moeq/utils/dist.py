"""Several processes on torch.distributed (``torchrun``): who this process is, and the collectives moeq uses.

A run started with ``torchrun --nproc-per-node N -m moeq quantize ...`` has N processes (ranks), one per
device. Every rank runs the same block loop on its share of the calibration batches (data parallel), the
statistics of a group's linears are summed on the rank that solves them, each rank solves its share of
the group (expert parallel, balanced by estimated cost) and every rank receives every result, so all
ranks hold the same quantized block before it is propagated. Rank 0 writes the outputs.

:class:`Dist` is passed explicitly (``RunOptions.dist``); ``Dist()`` is the single process, where every
collective is the identity and nothing here touches torch.distributed. nccl on GPUs, gloo on CPU, the
same code; the process group's timeout turns a rank that died into an error on the others, not a hang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    backend: str | None = None
    device: str = "cpu"  # where collectives run: this rank's GPU for nccl, the CPU for gloo

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> list[int]:
        """This rank's items among ``n`` (round robin: item k goes to rank k mod world)."""
        return list(range(self.rank, n, self.world))

    def assign(self, costs: list[float]) -> list[int]:
        """The rank of each item: largest cost first to the least-loaded rank (ties: lowest rank), the same
        on every rank."""
        load, owner = [0.0] * self.world, [0] * len(costs)
        for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[k], load[r] = r, load[r] + costs[k]
        return owner

    # ------------------------------------------------------------------ collectives (identity when alone)
    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (decisions that decide who takes part in later collectives)."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place on every rank."""
        if self.enabled:
            self._run(t, lambda x: tdist.all_reduce(x, op=tdist.ReduceOp.SUM))
        return t

    def sum_to_(self, t: torch.Tensor, dst: int) -> torch.Tensor:
        """Sum ``t`` over the ranks into rank ``dst``'s ``t`` (the others' are left undefined)."""
        if self.enabled:
            self._run(t, lambda x: tdist.reduce(x, dst=dst, op=tdist.ReduceOp.SUM))
        return t

    def _run(self, t: torch.Tensor, op) -> None:
        """``op`` on ``t``, through a copy on the collective device when ``t`` lives elsewhere."""
        if t.device == torch.device(self.device):
            op(t)
        else:
            x = t.to(self.device)
            op(x)
            t.copy_(x)

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets WORLD_SIZE) with > 1 rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str, timeout_s: float = 1800) -> tuple[Dist, str]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); -> (Dist,
    this rank's device). GPU runs use ``cuda:LOCAL_RANK`` and nccl, CPU runs gloo. A single process: (Dist(),
    device)."""
    if not launched():
        return Dist(), device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local:
            raise ValueError(f"rank {rank} needs GPU {local} but this node has {torch.cuda.device_count()}; use "
                             "--nproc-per-node <= the GPUs of a node, or --device cpu")
        device, backend = f"cuda:{local}", "nccl"
        torch.cuda.set_device(local)
    else:
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return Dist(rank, world, backend, device if backend == "nccl" else "cpu"), device


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
