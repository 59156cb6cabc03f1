"""Run the command line under tcmalloc when the machine has it.

PyTorch on CPU allocates and frees many short-lived tensors; glibc's malloc
returns that memory to the system and faults it in again. With tcmalloc
preloaded, training on NaCl-water ran 1.66x and ASE inference 1.34x faster in
``benchmarks/speed.py`` (docs/benchmarks/report.md). An allocator can only be
preloaded when a process starts, so the ``mfmlip`` command re-executes itself
once. ``MFMLIP_ALLOCATOR=system`` turns this off.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

ENV = "MFMLIP_ALLOCATOR"


def find_tcmalloc() -> str | None:
    """Library name of tcmalloc (Debian: ``libtcmalloc-minimal4``), or None."""
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def reexec_with_tcmalloc(argv: list[str]) -> None:
    """Replace this process by ``python -m mfmlip.cli.main ARGV`` with tcmalloc preloaded.

    Returns without doing anything when tcmalloc is missing, already loaded, or
    ``MFMLIP_ALLOCATOR`` is set (the re-executed process sets it, so this runs once).
    """
    if os.environ.get(ENV) or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = find_tcmalloc()
    if lib is None:
        return
    preload = " ".join(filter(None, [lib, os.environ.get("LD_PRELOAD")]))
    env = {**os.environ, "LD_PRELOAD": preload, ENV: "tcmalloc"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mfmlip.cli.main", *argv], env)
