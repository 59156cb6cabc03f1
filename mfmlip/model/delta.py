"""Delta-learning: a base model at a fixed low fidelity plus a learned correction.

The baseline of the field for scarce high-level data (Ramakrishnan et al.,
J. Chem. Theory Comput. 11, 2087 (2015)): E_high(x) = E_base(x) + dE(x), where
the correction model is trained on high-level labels minus the base model's
predictions on the same structures, so no structure needs both levels.
"""

from __future__ import annotations

import torch

from mfmlip import keys as K
from mfmlip.model.interface import Potential
from mfmlip.model.potential import MFPotential

SUMMED = (K.ENERGY, K.ATOMIC_ENERGY)


class DeltaPotential(Potential):
    """``base`` evaluated at ``base_fidelity`` plus ``correction`` at the requested one.

    A :class:`~mfmlip.model.interface.Potential` like :class:`MFPotential`, so
    the calculator, evaluation and model file treat both alike; forces and
    stress come from the derivative of the summed energy. The fidelities are
    the correction's.

    Parameters
    ----------
    base : trained low-level model; its weights are not trained further.
    base_fidelity : the base model's fidelity that is corrected.
    correction : model of the difference (high minus base), same cutoff.

    Raises
    ------
    ValueError
        Different cutoffs, an unknown ``base_fidelity``, or correction species the base lacks.
    """

    def __init__(self, base: MFPotential, base_fidelity: str, correction: MFPotential):
        if base.cutoff != correction.cutoff:
            raise ValueError(f"delta model: base cutoff {base.cutoff} != correction cutoff {correction.cutoff}")
        missing = sorted(set(correction.species) - set(base.species))
        if missing:
            raise ValueError(f"delta model: the base model lacks elements {missing} (atomic numbers)")
        super().__init__(correction.species, correction.fidelities, correction.cutoff)
        self.base_fidelity_index = base.fidelity_index(base_fidelity)
        self.base, self.correction, self.base_fidelity = base, correction, base_fidelity
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.correction.dtype

    @property
    def e0(self) -> torch.Tensor:
        """(n_fidelities, n_species) reference energies, eV: base at its fidelity plus correction."""
        cols = self.base.species_index(torch.tensor(self.species, device=self.base.e0.device))
        return self.correction.e0 + self.base.e0[self.base_fidelity_index, cols]

    def e0_table(self):
        return self.e0.detach().cpu().numpy()

    def energy(self, batch: dict) -> dict:
        """Outputs of :meth:`MFPotential.energy`; energies are sums of the two
        models, ``node_features`` the base model's."""
        self.correction.species_index(batch[K.ATOMIC_NUMBERS])  # unknown elements: the correction's error
        at_base = dict(batch, **{K.FIDELITY: torch.full_like(batch[K.FIDELITY], self.base_fidelity_index)})
        low = self.base.energy(at_base)
        out = self.correction.energy(batch)
        for key in SUMMED:
            out[key] = out[key] + low[key]
        out[K.NODE_FEATURES] = low[K.NODE_FEATURES]
        return out
