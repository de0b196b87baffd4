"""Progress bars and logging, in one place (tqdm; MOEQ_QUIET=1 silences the bars and the info lines)."""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

log = logging.getLogger("moeq")


def progress(iterable=None, desc: str = "", total: int | None = None, unit: str = "it", leave: bool = False,
             initial: int = 0):
    """A tqdm bar on stderr; disabled by MOEQ_QUIET=1."""
    disable = os.environ.get("MOEQ_QUIET") == "1"
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, initial=initial)


def setup_logging(verbose: bool = False) -> None:
    """moeq's log on stderr: debug lines with ``verbose``; else info lines, or only warnings under MOEQ_QUIET=1."""
    quiet = os.environ.get("MOEQ_QUIET") == "1"
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "compressed_tensors", "httpx", "urllib3", "filelock", "gguf", "gguf.gguf_writer"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
