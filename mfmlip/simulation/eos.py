"""Equation of state: energy-volume curve with relaxed positions, fitted with ASE."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.eos import EquationOfState
from ase.units import GPa

from mfmlip.analysis.figures import new_figure, save_figure
from mfmlip.simulation.relax import relax

DEFAULT_EOS = ("murnaghan", "birchmurnaghan")
#: the equations of state :class:`ase.eos.EquationOfState` knows
ASE_EOS_NAMES = ("sj", "taylor", "murnaghan", "birch", "birchmurnaghan", "pouriertarantola",
                 "vinet", "anton-schmidt", "p3")


@dataclass
class EOSResult:
    """Energy-volume points and the fitted equations of state.

    Attributes
    ----------
    volumes : ndarray, shape (n_points,)
        Volume per atom, Angstrom^3/atom.
    energies : ndarray, shape (n_points,)
        Energy per atom after relaxing positions at fixed cell, eV/atom.
    converged : ndarray of bool, shape (n_points,)
        Whether the position relaxation at each volume met ``fmax``.
    fits : dict
        ``{eos_name: {"E0": eV/atom, "V0": Angstrom^3/atom, "B": GPa}}``.
    n_atoms : int
        Atoms in the cell.
    """

    volumes: np.ndarray
    energies: np.ndarray
    converged: np.ndarray
    fits: dict = field(default_factory=dict)
    n_atoms: int = 0

    def table(self) -> str:
        """The fits as a text table (E0 eV/atom, V0 Angstrom^3/atom, B GPa)."""
        lines = [f"{'EOS':<16}{'E0 (eV/atom)':>14}{'V0 (A^3/atom)':>15}{'B (GPa)':>10}"]
        for name, fit in self.fits.items():
            lines.append(f"{name:<16}{fit['E0']:>14.6f}{fit['V0']:>15.4f}{fit['B']:>10.2f}")
        return "\n".join(lines)


def equation_of_state(
    atoms: Atoms,
    calc: Calculator,
    points: int = 9,
    volume_range: tuple[float, float] = (0.90, 1.10),
    eos: tuple[str, ...] | list[str] = DEFAULT_EOS,
    fmax: float = 0.01,
    relax_steps: int = 200,
    optimizer: str = "LBFGS",
    plot: str | Path | None = None,
) -> EOSResult:
    """Energy per atom against volume per atom, fitted with :class:`ase.eos.EquationOfState`.

    The cell of ``atoms`` is scaled isotropically (shape kept) to volumes
    ``f * V`` for ``points`` factors ``f`` evenly spaced over
    ``volume_range``; at each volume the positions are relaxed at fixed cell
    (:func:`mfmlip.simulation.relax.relax`). The reference volume ``V`` is
    that of ``atoms`` as given: relax it first (e.g. ``relax(..., cell=True)``)
    if the range should be centred on the minimum.

    Parameters
    ----------
    atoms : ase.Atoms
        3D-periodic structure (not modified).
    calc : ase Calculator
        Energies in eV, forces in eV/Angstrom.
    points : int
        Number of volumes, at least 5.
    volume_range : (float, float)
        Smallest and largest volume as fractions of the volume of ``atoms``.
    eos : sequence of str
        ASE equation-of-state names, e.g. ``"murnaghan"``, ``"birchmurnaghan"``,
        ``"vinet"``, ``"sj"``.
    fmax : float
        Position-relaxation criterion at each volume, eV/Angstrom.
    relax_steps : int
        Maximum optimiser steps per volume (0: no relaxation).
    optimizer : {"LBFGS", "FIRE"}
    plot : path, optional
        Write a PNG of the points and fitted curves there.

    Returns
    -------
    EOSResult
        ``fits[name]`` holds E0 (eV/atom), V0 (Angstrom^3/atom) and bulk
        modulus B (GPa) for each requested ``eos``.

    Raises
    ------
    ValueError
        Structure not 3D-periodic, fewer than 5 points, a bad
        ``volume_range``, an unknown EOS name, or a fit that fails (e.g. the
        energy has no minimum inside the range).
    """
    if not bool(np.all(atoms.pbc)):
        raise ValueError(f"the equation of state needs a 3D-periodic structure, got pbc={atoms.pbc.tolist()}")
    if points < 5:
        raise ValueError(f"need at least 5 points for a 4-parameter EOS fit, got {points}")
    lo, hi = (float(x) for x in volume_range)
    if not 0 < lo < hi:
        raise ValueError(f"volume_range must be 0 < low < high, got {volume_range}")
    for name in eos:
        if name not in ASE_EOS_NAMES:
            raise ValueError(f"unknown EOS {name!r}; ASE offers {list(ASE_EOS_NAMES)}")

    n = len(atoms)
    cell0 = atoms.cell.array.copy()
    volumes, energies, converged = [], [], []
    for factor in np.linspace(lo, hi, points):
        scaled = atoms.copy()
        scaled.set_cell(cell0 * factor ** (1.0 / 3.0), scale_atoms=True)
        if relax_steps > 0:
            scaled, ok = relax(scaled, calc, fmax=fmax, optimizer=optimizer, steps=relax_steps)
        else:
            scaled.calc, ok = calc, True
        volumes.append(scaled.get_volume() / n)
        energies.append(scaled.get_potential_energy() / n)
        converged.append(ok)
    result = EOSResult(np.array(volumes), np.array(energies), np.array(converged), {}, n)
    fit_eos(result, eos)
    if plot is not None:
        plot_eos(result, plot)
    return result


def fit_eos(result: EOSResult, eos: tuple[str, ...] | list[str] = DEFAULT_EOS) -> EOSResult:
    """Fit equations of state to the points of ``result`` and store them in ``result.fits``.

    Returns ``result``. Fits made before a failing one are kept, so the points
    and any good fit survive a phase whose energy has no minimum in range.

    Raises
    ------
    ValueError
        An unknown EOS name, or a fit that fails or puts V0 outside the sampled volumes.
    """
    for name in eos:
        if name not in ASE_EOS_NAMES:
            raise ValueError(f"unknown EOS {name!r}; ASE offers {list(ASE_EOS_NAMES)}")
    for name in eos:
        fit = EquationOfState(result.volumes, result.energies, eos=name)
        try:
            with np.errstate(all="ignore"):  # overflow while scipy explores; a bad fit is caught below
                v0, e0, b = fit.fit(warn=False)
        except (RuntimeError, ValueError, TypeError) as err:  # scipy curve_fit failure
            raise ValueError(f"{name} EOS fit failed: {err}") from err
        if not (np.isfinite([v0, e0, b]).all() and result.volumes.min() <= v0 <= result.volumes.max()):
            raise ValueError(
                f"{name} EOS fit: minimum V0={v0:.4g} A^3/atom lies outside the sampled volumes "
                f"{result.volumes.min():.4g}-{result.volumes.max():.4g}; relax the cell first or widen volume_range"
            )
        result.fits[name] = {"E0": float(e0), "V0": float(v0), "B": float(b / GPa)}
    return result


def plot_eos(result: EOSResult, path: str | Path, title: str = "") -> Path:
    """PNG of E (eV/atom) against V (Angstrom^3/atom): points and each fitted curve.

    Returns the path written.
    """
    fig, ax = new_figure(figsize=(5, 4))
    ax.plot(result.volumes, result.energies, "o", color="k", label="relaxed points")
    for name, fit in result.fits.items():
        eos = EquationOfState(result.volumes, result.energies, eos=name)
        eos.fit(warn=False)
        _, _, _, _, v, e, _, _ = eos.getplotdata()
        ax.plot(v, e, label=f"{name}: V0={fit['V0']:.3f} A$^3$, B={fit['B']:.1f} GPa")
    ax.set_xlabel("volume (A$^3$/atom)")
    ax.set_ylabel("energy (eV/atom)")
    ax.set_title(title or f"equation of state ({result.n_atoms} atoms/cell)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
