"""Checkpoints for Lightning: atomic writes (temporary file, then rename), never
of non-finite weights, and ``last.ckpt`` kept current every epoch."""

from __future__ import annotations

import os
import warnings

import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from mfmlip.atomic_io import atomic_torch_save


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


class LastCheckpointEveryEpoch(Checkpoint):
    """Write the ``last`` checkpoint of the trainer's ``ModelCheckpoint`` at the end
    of every training epoch.

    Lightning >= 2.5 writes ``last.ckpt`` only together with a new best
    checkpoint, so a run killed after epochs without improvement would resume
    from the last improving epoch and redo the others. Being a ``Checkpoint``,
    this runs after early stopping and the ``ModelCheckpoint`` (Lightning orders
    checkpoint callbacks last), at the point where that one saves when the
    validation runs once per epoch; the state it writes is the same.
    """

    def on_train_epoch_end(self, trainer, pl_module):
        cb = trainer.checkpoint_callback
        if cb is None or not cb.save_last or cb.dirpath is None:
            return
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        trainer.save_checkpoint(os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION), weights_only=False)
