"""PyTorch Lightning module: masked multi-fidelity loss, AdamW/Adam, cosine decay."""

from __future__ import annotations

import lightning as L
import torch

from mfmlip import keys as K
from mfmlip.analysis.metrics import MetricAccumulator
from mfmlip.data.graph import to_device
from mfmlip.model.potential import MFPotential
from mfmlip.training.loss import MaskedLoss


class MFLightningModule(L.LightningModule):
    """Trains an :class:`MFPotential`.

    Parameters
    ----------
    model_hparams : keyword arguments of :class:`MFPotential` (e0 included).
    loss_weights : (n_fidelities, 3) energy/forces/stress weights.
    optim : dict with lr, min_lr_ratio, optimizer, weight_decay, max_epochs, loss,
        huber_delta, nonfinite_loss ("stop" or "skip").
    dtype : "float32" or "float64".
    """

    def __init__(self, model_hparams: dict, loss_weights, optim: dict, dtype: str = "float32"):
        super().__init__()
        self.save_hyperparameters()
        self.model = MFPotential(**model_hparams).to(getattr(torch, dtype))
        self.loss_fn = MaskedLoss(torch.as_tensor(loss_weights), optim["loss"], optim["huber_delta"])
        self.optim = optim
        self._val_metrics = None
        self.train_sources: list[str] = []  # set by the run, for error messages
        self.skipped_batches = 0

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return to_device(batch, self.device, self.model.dtype)

    def _step(self, batch):
        pred = self.model(batch, compute_forces=self.loss_fn.needs_forces, compute_stress=self.loss_fn.needs_stress)
        loss, parts = self.loss_fn(pred, batch)
        return pred, loss, parts

    def training_step(self, batch, batch_idx):
        _, loss, parts = self._step(batch)
        if not torch.isfinite(loss):
            return self._nonfinite(loss, batch)
        n = batch["n_atoms"].shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=n)
        for k, v in parts.items():
            self.log(f"train_{k}", v, batch_size=n)
        return loss

    def _nonfinite(self, loss, batch):
        """Stop with the batch's structures named, or skip the batch and count it."""
        names = [
            self.train_sources[i] if i < len(self.train_sources) else f"structure #{i}"
            for i in batch[K.STRUCTURE_INDEX].tolist()
        ]
        if self.optim.get("nonfinite_loss") == "skip":
            self.skipped_batches += 1
            self.log("skipped_batches", float(self.skipped_batches))
            return None  # Lightning skips the optimiser step
        raise FloatingPointError(
            f"loss is {loss.item()} in a batch of {names}; lower training.lr, or set "
            "training.nonfinite_loss: skip to skip such batches"
        )

    def on_validation_epoch_start(self):
        self._val_metrics = MetricAccumulator(self.model.fidelities)

    def validation_step(self, batch, batch_idx):
        pred, loss, _ = self._step(batch)
        self._val_metrics.update(pred, batch)
        self.log("val_loss", loss, prog_bar=True, batch_size=batch["n_atoms"].shape[0])

    def on_validation_epoch_end(self):
        for fid, m in self._val_metrics.compute().items():
            for q in ("energy", "forces"):
                if f"{q}_mae" in m:
                    self.log(f"val_{q}_mae/{fid}", m[f"{q}_mae"], prog_bar=False)

    def configure_optimizers(self):
        o = self.optim
        cls = torch.optim.AdamW if o["optimizer"] == "adamw" else torch.optim.Adam
        opt = cls(self.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=o["max_epochs"], eta_min=o["lr"] * o["min_lr_ratio"]
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
