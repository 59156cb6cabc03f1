"""ASE calculator for a trained mfmlip model at a chosen fidelity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from mfmlip import keys as K
from mfmlip.data.graph import atoms_to_batch, to_device
from mfmlip.model.serialization import load_model


class MFCalculator(Calculator):
    """Energy (eV), free_energy (eV), forces (n_atoms, 3) eV/Angstrom and
    stress (6,) Voigt eV/Angstrom^3 (ASE sign; only for 3D-periodic cells).

    Parameters
    ----------
    model : path of a model file written by ``mfmlip train``, or an :class:`MFPotential`
        or :class:`~mfmlip.model.delta.DeltaPotential`.
    fidelity : the level of theory to reproduce; required, no default.
    device : torch device, e.g. ``"cpu"`` or ``"cuda"``.
    dtype : ``"float32"`` or ``"float64"``; default: the model object's own
        dtype, or float32 for a model file.
    min_distance : Angstrom; structures with two atoms closer than this are
        refused (the model has never seen such geometries).

    Raises
    ------
    ValueError
        Missing or unknown fidelity (the message lists the model's fidelities);
        at calculation time, an unknown element or overlapping atoms.

    Examples
    --------
    >>> from ase.build import molecule
    >>> from mfmlip.model import MFPotential
    >>> calc = MFCalculator(MFPotential([1, 8], ["PBE", "MP2"], channels=8, lmax=1, num_layers=1), fidelity="MP2")
    >>> atoms = molecule("H2O"); atoms.calc = calc
    >>> atoms.get_forces().shape
    (3, 3)
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(
        self,
        model: str | Path | torch.nn.Module,
        fidelity: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | None = None,
        min_distance: float = 0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(model, torch.nn.Module):
            torch_dtype = getattr(torch, dtype) if dtype else model.dtype
            self.model = model.to(device=device, dtype=torch_dtype).eval()
        else:
            torch_dtype = getattr(torch, dtype or "float32")
            self.model = load_model(model, device=device, dtype=torch_dtype)
        if fidelity is None:
            raise ValueError(f"fidelity is required; this model has {self.model.fidelities}")
        self.fidelity_index = self.model.fidelity_index(fidelity)
        self.fidelity = fidelity
        self.device, self.dtype, self.min_distance = torch.device(device), torch_dtype, float(min_distance)

    def _batch(self, atoms) -> dict:
        # atoms_to_batch refuses atoms closer than min_distance (DataError, a ValueError)
        batch = atoms_to_batch(atoms, self.model.cutoff, self.fidelity_index, min_distance=self.min_distance)
        return to_device(batch, self.device, self.dtype)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        want_stress = "stress" in properties and bool(self.atoms.pbc.all())  # MD asks for forces only
        out = self.model(self._batch(self.atoms), compute_forces=True, compute_stress=want_stress)
        energy = float(out[K.ENERGY].item())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out[K.FORCES].detach().cpu().numpy().astype(np.float64),
        }
        if want_stress:
            stress = out[K.STRESS][0].detach().cpu().numpy().astype(np.float64)
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
