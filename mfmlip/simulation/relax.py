"""Geometry optimisation with ASE optimisers (positions, optionally the cell)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE, LBFGS
from ase.units import GPa

OPTIMIZERS = {"LBFGS": LBFGS, "FIRE": FIRE}


def relax(
    atoms: Atoms,
    calc: Calculator,
    fmax: float = 0.01,
    optimizer: str = "LBFGS",
    cell: bool = False,
    steps: int = 1000,
    trajectory: str | Path | None = None,
    logfile: str | Path | None = None,
    pressure_GPa: float = 0.0,
) -> tuple[Atoms, bool]:
    """Relax atomic positions (and with ``cell=True`` the cell) until converged.

    Works on a copy: ``atoms`` itself is not changed.

    Parameters
    ----------
    atoms : ase.Atoms
        Starting structure, n_atoms atoms; positions in Angstrom.
    calc : ase Calculator
        E.g. :class:`mfmlip.MFCalculator` or any ASE calculator; with
        ``cell=True`` it must provide stress (eV/Angstrom^3).
    fmax : float
        Convergence criterion in eV/Angstrom: the largest atomic force norm,
        and with ``cell=True`` also the largest component of the
        :class:`ase.filters.FrechetCellFilter` cell "force" (virial per atom,
        eV), must fall below it.
    optimizer : {"LBFGS", "FIRE"}
        :class:`ase.optimize.LBFGS` or :class:`ase.optimize.FIRE`.
    cell : bool
        Also relax the cell shape and volume, through
        :class:`ase.filters.FrechetCellFilter`.
    steps : int
        Maximum number of optimiser steps.
    trajectory : path, optional
        ASE trajectory (``.traj``) of every step: the full atoms with cell,
        energy (eV), forces (eV/Angstrom) and, if computed, stress.
    logfile : path or "-", optional
        The optimiser's text log ("-" is stdout); default: no log.
    pressure_GPa : float
        External hydrostatic pressure in GPa for ``cell=True`` (enthalpy
        ``E + pV`` is minimised); ignored without ``cell``.

    Returns
    -------
    relaxed : ase.Atoms
        The relaxed copy, with ``calc`` attached.
    converged : bool
        True if the criterion was met within ``steps``.

    Raises
    ------
    ValueError
        Unknown ``optimizer``, ``fmax <= 0``, ``steps < 0``, or ``cell=True``
        for a structure that is not periodic in all three directions.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {sorted(OPTIMIZERS)}")
    if not fmax > 0:
        raise ValueError(f"fmax must be > 0 eV/Angstrom, got {fmax}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if cell and not bool(np.all(atoms.pbc)):
        raise ValueError(f"cell relaxation needs a 3D-periodic structure, got pbc={atoms.pbc.tolist()}")
    relaxed = atoms.copy()
    relaxed.calc = calc
    target = FrechetCellFilter(relaxed, scalar_pressure=pressure_GPa * GPa) if cell else relaxed
    traj = str(trajectory) if trajectory is not None else None
    if traj is not None:
        Path(traj).parent.mkdir(parents=True, exist_ok=True)
    with OPTIMIZERS[optimizer](target, trajectory=traj, logfile=str(logfile) if logfile else None) as opt:
        converged = bool(opt.run(fmax=fmax, steps=steps))
    return relaxed, converged


def max_force(atoms: Atoms) -> float:
    """Largest atomic force norm in eV/Angstrom (0.0 for an empty structure)."""
    forces = atoms.get_forces()
    return float(np.linalg.norm(forces, axis=1).max()) if len(forces) else 0.0
