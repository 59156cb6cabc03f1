"""The memory allocator of the command line: tcmalloc when the machine has it,
else glibc's malloc tuned to keep freed memory.

PyTorch on CPU allocates and frees many short-lived tensors; glibc's malloc
returns large blocks to the system and faults them in again.
:func:`tune_glibc_malloc` stops that in-process (no extra package); tcmalloc
(Debian ``libtcmalloc-minimal4``) can only be preloaded when a process
starts, so the ``mfmlip`` command re-executes itself once when it is
installed. ``MFMLIP_ALLOCATOR=glibc`` skips tcmalloc (tuned glibc only),
``MFMLIP_ALLOCATOR=system`` turns both off. Measured in
``benchmarks/allocator.py`` (docs/benchmarks/allocator.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "MFMLIP_ALLOCATOR"
# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def tune_glibc_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the system.

    By default glibc serves blocks above 128 kB-32 MB with ``mmap`` and gives
    them back on ``free``, so a training step that frees and re-allocates the
    same large tensors faults in fresh zeroed pages every time
    (``benchmarks/allocator.py`` counts them). Raising the mmap and trim
    thresholds (bytes) keeps those pages mapped for reuse: the process's
    resident memory stays at its peak instead.

    Returns
    -------
    bool
        True when glibc accepted every setting; False on other C libraries.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad))
    return all(mallopt(param, value) == 1 for param, value in settings)


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
