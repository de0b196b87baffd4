"""Device choice and memory readings; the only device policy in moeq besides the block loop."""

from __future__ import annotations

import resource
import sys

import torch


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown --device {device!r}; use auto, cpu or cuda[:N]")
    return device


def peak_rss_bytes() -> int:
    """Peak resident memory of this process. On Linux the kernel's high-water mark of this program
    (``VmHWM``): ``ru_maxrss`` also counts the parent's memory the process was forked from before exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_memory_mb() -> dict:
    """Peak resident memory of this process (and peak CUDA allocation when a GPU was used), MiB."""
    out = {"cpu_rss": round(peak_rss_bytes() / (1 << 20), 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_allocated"] = round(torch.cuda.max_memory_allocated() / (1 << 20), 1)
    return out


def fits_on_device(model: torch.nn.Module, device: str, fraction: float = 0.6) -> bool:
    """Whether the whole model fits comfortably in the device's memory (CPU: always in place)."""
    if device == "cpu":
        return False
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    return need < torch.cuda.get_device_properties(torch.device(device)).total_memory * fraction
