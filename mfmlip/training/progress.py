"""Progress reporting: a tqdm bar in a terminal, one line per epoch in logs."""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class EpochSummary(L.Callback):
    """Prints ``epoch k/n (s), train_loss ... val_loss ... | per-fidelity MAEs`` after each
    epoch, with its wall seconds (``on_train_epoch_end`` runs after that epoch's validation)."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    on_train_start = on_train_epoch_start  # a run resumed inside an epoch starts no epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero:  # one line per epoch, not one per process
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        seconds = time.perf_counter() - self.started
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} ({seconds:.1f} s)"]
        parts += [f"{k} {m[k]:.4g}" for k in ("train_loss", "val_loss") if k in m]
        maes = [f"{k[4:]} {v:.1f}" for k, v in sorted(m.items()) if k.startswith("val_") and "_mae/" in k]
        print(", ".join(parts) + (" | " + ", ".join(maes) if maes else ""), flush=True)


def progress_callback(n_batches: int) -> L.Callback:
    """A tqdm bar when stderr is a terminal, else :class:`EpochSummary`."""
    if sys.stderr.isatty():
        return TQDMProgressBar(refresh_rate=max(1, n_batches // 20))
    return EpochSummary()
