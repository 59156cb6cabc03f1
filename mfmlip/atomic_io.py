"""Atomic file writes: a temporary file in the same folder, fsync, then rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO], None], mode: str = "wb", **open_kwargs) -> None:
    """Call ``write(fh)`` on a temporary file, then rename it to ``path``.

    ``mode`` and ``open_kwargs`` (e.g. ``newline=""``) are passed to ``open``.

    A kill or an error during the write leaves any previous file at ``path``
    intact and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            write(fh)
            if not fh.closed:  # some writers (ASE Trajectory) close the file themselves
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write` (model files and checkpoints).

    A kill during the write leaves any previous file at ``path`` intact.
    """
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh))
