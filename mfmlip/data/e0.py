"""Per-fidelity element reference energies E0 (Ko & Ong 2025, Eqs. 2-3)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from ase.data import atomic_numbers as Z_OF_SYMBOL
from ase.data import chemical_symbols

from mfmlip.data.structures import DataError, Structure


def composition_matrix(structures: list[Structure], species: list[int]) -> np.ndarray:
    """Counts of each species per structure, shape ``(n_structures, n_species)``."""
    column = {z: k for k, z in enumerate(species)}
    A = np.zeros((len(structures), len(species)))
    for row, s in enumerate(structures):
        for z, count in zip(*np.unique(s.atomic_numbers, return_counts=True)):
            A[row, column[int(z)]] = count
    return A


def fit_e0(structures: list[Structure], species: list[int], ridge: float = 0.0) -> np.ndarray:
    """Least-squares element reference energies of one fidelity.

    Solves ``E_total ~ A @ E0`` (Ko & Ong 2025, Eq. 3) with ``A`` the composition
    matrix. When ``A`` is rank-deficient (e.g. every structure has the same
    composition) the minimum-norm solution is returned, or the ridge solution
    when ``ridge > 0``. Structures without an energy are ignored.

    Returns
    -------
    (n_species,) array, eV per atom of each species (0 for species absent here).

    Raises
    ------
    DataError
        No structure carries an energy.

    Examples
    --------
    >>> import numpy as np
    >>> from mfmlip.data.structures import Structure
    >>> mk = lambda zs, e: Structure(np.zeros((len(zs), 3)), np.array(zs), np.zeros((3, 3)),
    ...                              np.zeros(3, bool), "PBE", energy=e)
    >>> fit_e0([mk([1, 1], -2.0), mk([1, 8], -6.0), mk([8], -5.0)], [1, 8]).round(6)
    array([-1., -5.])
    """
    with_energy = [s for s in structures if np.isfinite(s.energy)]
    if not with_energy:
        raise DataError("cannot fit E0: no structure of this fidelity has an energy")
    A = composition_matrix(with_energy, species)
    E = np.array([s.energy for s in with_energy])
    present = A.sum(0) > 0
    A = A[:, present]
    if ridge > 0:
        sol = np.linalg.solve(A.T @ A + ridge * np.eye(A.shape[1]), A.T @ E)
    else:
        sol = np.linalg.lstsq(A, E, rcond=None)[0]  # minimum-norm when rank-deficient
    e0 = np.zeros(len(species))
    e0[present] = sol
    return e0


def build_e0_table(
    structures: list[Structure],
    species: list[int],
    fidelities: list[str],
    given: dict[str, dict[str, float]] | None = None,
    ridge: float = 0.0,
) -> np.ndarray:
    """E0 for every fidelity, shape ``(n_fidelities, n_species)`` in eV.

    ``given`` maps a fidelity name to ``{element symbol: E0 in eV}``; those
    fidelities are taken as given (missing elements are 0), the others fitted
    with :func:`fit_e0`.

    Raises
    ------
    DataError
        A given element symbol is unknown.
    """
    given = given or {}
    by_fidelity = defaultdict(list)
    for s in structures:
        by_fidelity[s.fidelity].append(s)
    table = np.zeros((len(fidelities), len(species)))
    for f, name in enumerate(fidelities):
        if name in given:
            for symbol, value in given[name].items():
                if symbol not in Z_OF_SYMBOL:
                    raise DataError(f"E0 of fidelity '{name}': unknown element '{symbol}'")
                if Z_OF_SYMBOL[symbol] in species:
                    table[f, species.index(Z_OF_SYMBOL[symbol])] = value
        else:
            table[f] = fit_e0(by_fidelity[name], species, ridge)
    return table


def e0_as_dict(table: np.ndarray, species: list[int], fidelities: list[str]) -> dict:
    """``{fidelity: {symbol: E0}}`` view of an E0 table, for reports and files."""
    return {
        name: {chemical_symbols[z]: float(table[f, k]) for k, z in enumerate(species)}
        for f, name in enumerate(fidelities)
    }
