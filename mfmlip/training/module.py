"""PyTorch Lightning module: masked multi-fidelity loss, AdamW/Adam, cosine decay."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer

from mfmlip import keys as K
from mfmlip.analysis.metrics import MetricAccumulator
from mfmlip.data.graph import to_device
from mfmlip.model.compiled import CompiledPotential
from mfmlip.model.delta import DeltaPotential
from mfmlip.model.interface import Potential
from mfmlip.model.potential import MFPotential
from mfmlip.training.config import ConfigError, TrainingConfig
from mfmlip.training.loss import MaskedLoss


def time_cosine(share: float, min_ratio: float) -> float:
    """Learning-rate factor ``min_ratio + (1 - min_ratio) (1 + cos(pi share)) / 2`` at ``share`` of the budget."""
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * share))


class MFLightningModule(L.LightningModule):
    """Trains a :class:`~mfmlip.model.interface.Potential`.

    Parameters
    ----------
    model : the potential, already in its training dtype.
    training : the typed ``training:`` section of the config (optimiser,
        schedule, loss kind, non-finite handling).
    loss_weights : (n_fidelities, 3) energy/forces/stress weights, in the
        order of ``model.fidelities``.
    stage_two_weights : the same from ``training.stage_two.start_epoch`` on (default: ``loss_weights``).
    """

    def __init__(self, model: Potential, training: TrainingConfig, loss_weights, stage_two_weights=None):
        super().__init__()
        self.model = model
        self.training_config = training
        self.loss_fn = MaskedLoss(torch.as_tensor(loss_weights), training.loss, training.huber_delta)
        two = loss_weights if stage_two_weights is None else stage_two_weights
        self._stage_weights = [torch.as_tensor(w, dtype=torch.float32) for w in (loss_weights, two)]
        self._val_metrics = None
        self.train_structures = []  # set by the run: its training split, to name structures in errors
        self.skipped_batches = 0
        # training.compile: training steps through one compiled graph (validation stays eager)
        self.compiled = None
        if training.compile:
            if not isinstance(model, (MFPotential, DeltaPotential)):
                raise ConfigError(f"training.compile: mfmlip's own models only, not {type(model).__name__}")
            self.compiled = CompiledPotential(model)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return to_device(batch, self.device, self.model.dtype)

    def _step(self, batch):
        # derivatives only for labels present in this batch (energy-only levels skip them)
        forces = self.loss_fn.needs_forces and bool(batch[K.FORCES_MASK].any())
        stress = self.loss_fn.needs_stress and bool(batch[K.STRESS_MASK].any())
        # training.compile: training steps through one compiled graph per derivative set
        predict = self.compiled if self.compiled is not None and self.training else self.model
        pred = predict(batch, compute_forces=forces, compute_stress=stress)
        loss, parts = self.loss_fn(pred, batch)
        return pred, loss, parts

    def training_step(self, batch, batch_idx):
        self._batch_indices = batch[K.STRUCTURE_INDEX].tolist()
        _, loss, parts = self._step(batch)
        if not torch.isfinite(loss):
            return self._nonfinite(f"loss is {loss.item()}")
        # logged on the steps the logger writes (every log_every_n_steps): with several processes each
        # log is a collective, which makes every process wait for the slowest
        if (self.trainer.global_step + 1) % self.trainer.log_every_n_steps:
            return loss
        names = ["loss", "energy"] + ["forces"] * self.loss_fn.needs_forces + ["stress"] * self.loss_fn.needs_stress
        zero = loss.detach().new_zeros(())  # a part with no labels in this batch adds nothing to its loss
        values = torch.stack([loss.detach()] + [parts.get(k, zero).detach() for k in names[1:]])
        # with several processes: the mean over them (the step's global batch), in one collective;
        # Lightning's sync_dist would cost a barrier and an all_reduce per value
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(values)
            values = values / self.trainer.world_size
        n = batch["n_atoms"].shape[0]
        for k, v in zip(names, values):
            self.log(f"train_{k}", v, prog_bar=k == "loss", batch_size=n)
        return loss

    def _names(self, indices: list[int]) -> list[str]:
        return [self.train_structures[i].source if i < len(self.train_structures) else f"structure #{i}"
                for i in indices]

    def _nonfinite(self, problem: str):
        """Stop with the batch's structures named, or skip the batch and count it."""
        if self.training_config.nonfinite_loss == "skip":
            self.skipped_batches += 1
            return None  # Lightning skips the optimiser step
        raise FloatingPointError(
            f"{problem} in a batch of {self._names(getattr(self, '_batch_indices', []))}; lower training.lr, or set "
            "training.nonfinite_loss: skip to skip such batches"
        )

    def on_before_optimizer_step(self, optimizer):
        """A finite loss can still have NaN/inf gradients: stop or skip as for a
        non-finite loss, before they reach the weights (gradient clipping would
        spread them to every weight)."""
        # one check of all gradients per step (the optimiser's list: no walk over the modules)
        grads = [p.grad.reshape(-1) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads or torch.isfinite(torch.cat(grads)).all():
            return
        bad = [n for n, p in self.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        self._nonfinite(f"gradient of {bad[:3]}{' ...' if len(bad) > 3 else ''} is not finite")
        optimizer.zero_grad(set_to_none=True)  # skipped: the optimiser leaves the weights alone

    def _stage_loss_weights(self) -> None:
        """The loss weights of the current epoch's stage (``training.stage_two``); set at every
        epoch start (also after a resume) and before validation, where the EMA callback has
        swapped in its running average of the module's buffers, these weights included."""
        two = self.training_config.stage_two
        stage = int(two is not None and self.current_epoch >= two.start_epoch)
        self.loss_fn.weights.copy_(self._stage_weights[stage])

    def on_train_epoch_start(self):
        two = self.training_config.stage_two
        if two is not None and self.current_epoch == two.start_epoch:
            self.print(f"stage two from epoch {two.start_epoch + 1}: loss weights (energy, forces, stress) per "
                       f"fidelity {dict(zip(self.model.fidelities, self._stage_weights[1].tolist()))}", flush=True)
        self._stage_loss_weights()

    def on_train_epoch_end(self):
        # once per epoch, so that it reaches logs/version_N/metrics.csv (step rows are thinned out)
        self.log("skipped_batches", float(self.skipped_batches), on_epoch=True, sync_dist=self.trainer.world_size > 1)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["skipped_batches"] = self.skipped_batches

    def on_load_checkpoint(self, checkpoint):
        self.skipped_batches = int(checkpoint.get("skipped_batches", 0))

    def on_validation_epoch_start(self):
        self._stage_loss_weights()
        self._val_metrics = MetricAccumulator(self.model.fidelities)
        self._val_loss = torch.zeros(2, dtype=torch.float64)  # sum of loss * structures, structures

    def validation_step(self, batch, batch_idx):
        pred, loss, _ = self._step(batch)
        self._val_metrics.update(pred, batch)
        n = batch["n_atoms"].shape[0]
        self._val_loss += torch.stack([loss.detach().double().cpu() * n, torch.tensor(float(n))])

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """Sum or max over the processes (identity with one)."""
        if self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.to(self.device), reduce_op=op)

    def on_validation_epoch_end(self):
        # every process's validation structures count once: sums reduced, then divided
        total, n = self._reduce(self._val_loss, "sum").tolist()
        several = self.trainer.world_size > 1  # the values are reduced already: the same in every process
        self.log("val_loss", total / max(n, 1.0), prog_bar=True, sync_dist=several)
        self._val_metrics.reduce(self._reduce)
        for fid, m in self._val_metrics.compute().items():
            for q in ("energy", "forces"):
                if f"{q}_mae" in m:
                    self.log(f"val_{q}_mae/{fid}", m[f"{q}_mae"], prog_bar=False, sync_dist=several)

    def _time_share(self) -> float:
        """Elapsed share of ``max_time_minutes`` (Lightning's Timer; restored on resume)."""
        timer = next(c for c in self.trainer.callbacks if isinstance(c, Timer))
        return min(1.0, timer.time_elapsed("train") / (60.0 * self.training_config.max_time_minutes))

    def configure_optimizers(self):
        t = self.training_config
        cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        # foreach: one update for all tensors (the CPU default loops over them in Python)
        opt = cls(self.parameters(), lr=t.lr, weight_decay=t.weight_decay, foreach=True)
        if t.decay_over == "time":  # cosine over the elapsed share of max_time_minutes, set every step
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: time_cosine(self._time_share(), t.min_lr_ratio))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=t.max_steps or t.max_epochs, eta_min=t.lr * t.min_lr_ratio
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step" if t.max_steps else "epoch"}}
