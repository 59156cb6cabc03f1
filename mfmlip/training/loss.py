"""Masked, per-fidelity weighted loss (Ko & Ong 2025, Eq. 1, with stress and masks).

``L = sum_terms  sum_items w_term[f] * mask * rho(err) / n_labelled``

with per-atom energy errors (eV/atom), force components (eV/Angstrom) and
stress components (eV/Angstrom^3); ``rho`` is the square (MSE) or Huber.
"""

from __future__ import annotations

import torch

from mfmlip import keys as K


class MaskedLoss(torch.nn.Module):
    """Parameters
    ----------
    weights : (n_fidelities, 3) tensor of energy, forces, stress weights.
    kind : ``"mse"`` or ``"huber"``.
    huber_delta : Huber transition point, in the units of each term.
    """

    def __init__(self, weights: torch.Tensor, kind: str = "mse", huber_delta: float = 0.01):
        super().__init__()
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32))
        self.kind, self.delta = kind, float(huber_delta)

    @property
    def needs_forces(self) -> bool:
        return bool((self.weights[:, 1] > 0).any())

    @property
    def needs_stress(self) -> bool:
        return bool((self.weights[:, 2] > 0).any())

    def _rho(self, err: torch.Tensor) -> torch.Tensor:
        if self.kind == "huber":
            return torch.nn.functional.huber_loss(err, torch.zeros_like(err), reduction="none", delta=self.delta)
        return err**2

    def _term(self, err, mask, weight) -> torch.Tensor:
        """err (n, ...) masked by (n,) and weighted by (n,); mean over labelled entries."""
        m = mask & (weight > 0)
        err = torch.where(m.reshape(-1, *([1] * (err.dim() - 1))), err, torch.zeros_like(err))
        per_item = self._rho(err).reshape(err.shape[0], -1)
        m = m.to(err.dtype)
        count = (m.sum() * per_item.shape[1]).clamp(min=1.0)
        return (per_item.sum(1) * m * weight.to(err.dtype)).sum() / count

    def forward(self, pred: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        """Total loss (scalar) and its parts ``{"energy", "forces", "stress"}``."""
        fid = batch[K.FIDELITY]
        w = self.weights[fid]
        n = batch[K.N_ATOMS].to(pred[K.ENERGY].dtype)
        parts = {"energy": self._term((pred[K.ENERGY] - batch[K.ENERGY]) / n, batch[K.ENERGY_MASK], w[:, 0])}
        if K.FORCES in pred and self.needs_forces:
            w_atom = w[:, 1][batch[K.BATCH]]
            parts["forces"] = self._term(pred[K.FORCES] - batch[K.FORCES], batch[K.FORCES_MASK], w_atom)
        if K.STRESS in pred and self.needs_stress:
            parts["stress"] = self._term(pred[K.STRESS] - batch[K.STRESS], batch[K.STRESS_MASK], w[:, 2])
        return sum(parts.values()), parts
