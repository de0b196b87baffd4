"""Memory sizes and budgets: parse "5GB", read what is free on a device, format bytes for messages."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re

import torch

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, flag: str = "size") -> int:
    """"5GB" / "500MiB" / "1.5GB" / "123" -> bytes; a clear error for anything else."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{flag} must be a positive size like 5GB, 800MB or 2GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{int(n)} B"


def free_bytes(device) -> int:
    """Memory free for new tensors now: the GPU's free memory, or the host's available RAM."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8 if dtype.is_floating_point else torch.iinfo(dtype).bits // 8


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


_LIBC = _libc()


def trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def release_host_memory() -> None:
    """Give freed host memory back to the system. A block's tensors are thousands of mid-sized buffers;
    glibc keeps freed ones in its heap, so a streamed run's RSS would creep up block after block (measured:
    +8 MB per 26 MB block) without ``malloc_trim``. A no-op where glibc is absent."""
    gc.collect()
    trim_heap()
