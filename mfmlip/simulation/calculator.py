"""ASE calculator for a trained mfmlip model at a chosen fidelity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from mfmlip import keys as K
from mfmlip.data.graph import MIN_DISTANCE
from mfmlip.model.inference import Predictor, check_threads, resolve_dtype


class MFCalculator(Calculator):
    """Energy (eV), free_energy (eV), per-atom ``energies`` (n_atoms,) eV, forces
    (n_atoms, 3) eV/Angstrom and stress (6,) Voigt eV/Angstrom^3 (ASE sign; only
    for 3D-periodic cells).

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
    threads : intra-op threads per call; default None: one thread below
        :data:`~mfmlip.model.inference.SMALL_BATCH_ATOMS` atoms (a 9-atom
        molecule is no faster on two, and far slower when another process
        shares the cores), torch's setting above.

    ``fidelity``, ``device``, ``dtype``, ``min_distance`` and ``threads`` are the
    calculator's ``parameters``: ``calc.set(fidelity="MP2")`` (or
    ``calc.fidelity = "MP2"``) switches the level and clears the results.

    Raises
    ------
    ValueError
        Missing or unknown fidelity (the message lists the model's fidelities)
        or an unsupported dtype, here or in :meth:`set`; at calculation time,
        an unknown element or overlapping atoms.

    Examples
    --------
    >>> from ase.build import molecule
    >>> from mfmlip.model import MFPotential, ModelSpec
    >>> model = MFPotential(ModelSpec(species=[1, 8], fidelities=["PBE", "MP2"], channels=8, num_layers=1))
    >>> calc = MFCalculator(model, fidelity="MP2")
    >>> atoms = molecule("H2O"); atoms.calc = calc
    >>> atoms.get_forces().shape
    (3, 3)
    >>> calc.set(fidelity="PBE"); calc.parameters["fidelity"]
    {'fidelity': 'PBE'}
    'PBE'
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]
    default_parameters = {"fidelity": None, "device": "cpu", "dtype": None, "min_distance": MIN_DISTANCE,
                          "threads": None}

    def __init__(
        self,
        model: str | Path | torch.nn.Module,
        fidelity: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | None = None,
        min_distance: float = MIN_DISTANCE,
        threads: int | None = None,
        **kwargs,
    ):
        self.predictor = Predictor(model, fidelity, device, dtype, min_distance, threads)
        dtype_name = str(self.predictor.dtype).replace("torch.", "")
        super().__init__(fidelity=fidelity, device=str(device), dtype=dtype_name,
                         min_distance=float(min_distance), threads=threads, **kwargs)

    @property
    def model(self):
        """The potential (:class:`~mfmlip.model.interface.Potential`)."""
        return self.predictor.model

    @property
    def fidelity(self) -> str:
        return self.parameters["fidelity"]

    @fidelity.setter
    def fidelity(self, name: str) -> None:
        self.set(fidelity=name)

    def set(self, **kwargs) -> dict:
        """Change parameters; a change of any of them clears the results.

        Raises
        ------
        ValueError
            An unknown fidelity, an unsupported dtype or ``threads`` below 1;
            nothing is changed then.
        """
        if "fidelity" in kwargs:
            self.predictor.model.fidelity_index(kwargs["fidelity"])
        if "threads" in kwargs:
            check_threads(kwargs["threads"])
        if kwargs.get("dtype") is not None:
            kwargs["dtype"] = str(resolve_dtype(kwargs["dtype"])).replace("torch.", "")
        if "device" in kwargs:
            kwargs["device"] = str(kwargs["device"])
        changed = super().set(**kwargs)
        if changed:
            p = self.parameters
            self.predictor.set_fidelity(p["fidelity"])
            self.predictor.to(p["device"], p["dtype"])
            self.predictor.min_distance = float(p["min_distance"])
            self.predictor.threads = p["threads"]
            self.reset()
        return changed

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        want_stress = "stress" in properties and bool(self.atoms.pbc.all())  # MD asks for forces only
        # Predictor.batch refuses atoms closer than min_distance (DataError, a ValueError)
        out = self.predictor(self.predictor.batch([self.atoms]), forces=True, stress=want_stress)
        energy = float(out[K.ENERGY].item())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out[K.ATOMIC_ENERGY].cpu().numpy().astype(np.float64),
            "forces": out[K.FORCES].cpu().numpy().astype(np.float64),
        }
        if want_stress:
            stress = out[K.STRESS][0].cpu().numpy().astype(np.float64)
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
