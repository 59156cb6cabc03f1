"""Atomic checkpoint writing for Lightning: write a temporary file, then rename."""

from __future__ import annotations

from lightning.pytorch.plugins.io import TorchCheckpointIO

from mfmlip.model.serialization import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """A kill during a checkpoint write leaves the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_torch_save(checkpoint, path)
