"""Tiny labelled data sets and training configs for tests that run whole trainings.

Rattled water molecules labelled with a Morse potential (energies and forces
consistent with each other), written as extended XYZ into a test's folder.
"""

from __future__ import annotations

from pathlib import Path

import ase.io
import yaml
from ase.build import molecule
from ase.calculators.morse import MorsePotential
from ase.calculators.singlepoint import SinglePointCalculator

FIDELITY = "PBE"


def labelled_water(seed: int, rattle: float = 0.08, fidelity: str = FIDELITY):
    atoms = molecule("H2O")
    atoms.rattle(rattle, seed=seed)
    atoms.calc = MorsePotential(epsilon=2.0, r0=1.0, rho0=4.0)
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    atoms.info["fidelity"] = fidelity
    return atoms


def write_water(path: Path, n: int = 24, first_seed: int = 0) -> Path:
    ase.io.write(path, [labelled_water(first_seed + k) for k in range(n)], format="extxyz")
    return path


def tiny_config(folder: Path, name: str, files=None, seed: int = 0, data=None, **training) -> Path:
    """A config in ``folder/name.yaml`` training into ``folder/name`` on ``folder/water.extxyz``
    (written if missing): 16 train, 4 val, 4 test frames; a model of a few hundred weights.
    ``files`` replaces ``data.files``, ``data`` adds other ``data`` keys, ``training`` sets
    ``training`` keys."""
    if not (folder / "water.extxyz").is_file():
        write_water(folder / "water.extxyz")
    cfg = {
        "seed": seed,
        "output_dir": str(folder / name),
        "data": {"root": str(folder), "files": files or [
            {"path": "water.extxyz", "split": {"train": None, "val": 4, "test": 4}}], **(data or {})},
        "model": {"cutoff": 3.0, "channels": 8, "lmax": 1, "num_layers": 1, "num_radial": 4, "radial_hidden": 8},
        "training": {"batch_size": 4, "max_epochs": 4, "patience": 100, "lr": 0.01, **training},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
