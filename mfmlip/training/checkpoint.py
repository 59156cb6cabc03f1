"""Atomic checkpoint writing for Lightning: write a temporary file, then rename."""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mfmlip.model.serialization import atomic_torch_save


def nonfinite_weights(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` with NaN or inf entries."""
    return [
        name for name, value in state_dict.items()
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """A kill during a checkpoint write leaves the previous checkpoint intact.

    A checkpoint whose weights are NaN or inf is not written at all (with a
    warning): a diverged model never becomes ``best.ckpt`` or ``last.ckpt``,
    which keep their previous, finite contents.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        bad = nonfinite_weights(checkpoint.get("state_dict", {}))
        if bad:
            warnings.warn(
                f"not writing checkpoint {path}: the weights {bad[:3]}{' ...' if len(bad) > 3 else ''} "
                "are not finite; the previous checkpoint, if any, is kept",
                RuntimeWarning, stacklevel=2,
            )
            return
        atomic_torch_save(checkpoint, path)
