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


CHUNK = 4096  # composition rows per QR update


class StreamingLeastSquares:
    """``min ||A x - b||`` over rows added in chunks, in memory of ``(k, k)``.

    Keeps the triangular factor ``R`` of ``[A | b]`` (a QR update per chunk),
    so the solution is the one :func:`numpy.linalg.lstsq` gives on all rows at
    once (minimum norm when ``A`` is rank-deficient), up to rounding.
    """

    def __init__(self, k: int):
        self.k, self.n_rows = k, 0
        self.r = np.zeros((0, k + 1))
        self.column_used = np.zeros(k, dtype=bool)

    def add(self, rows: np.ndarray, targets: np.ndarray) -> None:
        """Add ``rows`` (m, k) of ``A`` and their ``targets`` (m,)."""
        stacked = np.vstack([self.r, np.column_stack([rows, targets])])
        self.r = np.linalg.qr(stacked, mode="r")
        self.n_rows += len(rows)
        self.column_used |= (rows != 0).any(axis=0)

    def solve(self, ridge: float = 0.0, columns: np.ndarray | None = None) -> np.ndarray:
        """The least-squares ``x`` over ``columns`` (a boolean mask; default all),
        or the ridge solution of ``(A^T A + ridge I) x = A^T b`` when ``ridge > 0``."""
        columns = np.ones(self.k, dtype=bool) if columns is None else columns
        r, z = self.r[:, :-1][:, columns], self.r[:, -1]
        if ridge > 0:
            return np.linalg.solve(r.T @ r + ridge * np.eye(r.shape[1]), r.T @ z)
        # the threshold lstsq would use on all of A (its singular values are R's)
        return np.linalg.lstsq(r, z, rcond=np.finfo(float).eps * max(self.n_rows, self.k))[0]


def fit_e0(structures: list[Structure], species: list[int], ridge: float = 0.0) -> np.ndarray:
    """Least-squares element reference energies of one fidelity.

    Solves ``E_total ~ A @ E0`` (Ko & Ong 2025, Eq. 3) with ``A`` the composition
    matrix. When ``A`` is rank-deficient (e.g. every structure has the same
    composition) the minimum-norm solution is returned, or the ridge solution
    when ``ridge > 0``. Structures without an energy are ignored. ``structures``
    is any iterable, read once (a store's frames stay on disk).

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
    fit = _least_squares(structures, species, lambda s: None).get(None)
    return _solve_e0(fit, species, ridge)


def _least_squares(structures, species: list[int], group) -> dict:
    """``{group(s): StreamingLeastSquares}`` of ``E ~ counts @ E0`` over the
    structures with an energy, in one pass."""
    column = {z: k for k, z in enumerate(species)}
    fits, pending = {}, defaultdict(lambda: ([], []))
    for s in structures:
        if not np.isfinite(s.energy):
            continue
        key = group(s)
        rows, energies = pending[key]
        row = np.zeros(len(species))
        np.add.at(row, [column[int(z)] for z in s.atomic_numbers], 1.0)
        rows.append(row)
        energies.append(s.energy)
        if len(rows) == CHUNK:
            fits.setdefault(key, StreamingLeastSquares(len(species))).add(np.array(rows), np.array(energies))
            pending[key] = ([], [])
    for key, (rows, energies) in pending.items():
        if rows:
            fits.setdefault(key, StreamingLeastSquares(len(species))).add(np.array(rows), np.array(energies))
    return fits


def _solve_e0(fit: StreamingLeastSquares | None, species: list[int], ridge: float) -> np.ndarray:
    if fit is None:
        raise DataError("cannot fit E0: no structure of this fidelity has an energy")
    present = fit.column_used
    sol = fit.solve(ridge, present)
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
    with :func:`fit_e0`, all in one pass over ``structures`` (any iterable).

    Raises
    ------
    DataError
        A given element symbol is unknown.
    """
    given = given or {}
    fits = _least_squares(structures, species, lambda s: s.fidelity if s.fidelity not in given else None)
    table = np.zeros((len(fidelities), len(species)))
    for f, name in enumerate(fidelities):
        if name in given:
            for symbol, value in given[name].items():
                if symbol not in Z_OF_SYMBOL:
                    raise DataError(f"E0 of fidelity '{name}': unknown element '{symbol}'")
                if Z_OF_SYMBOL[symbol] in species:
                    table[f, species.index(Z_OF_SYMBOL[symbol])] = value
        else:
            table[f] = _solve_e0(fits.get(name), species, ridge)
    return table


def e0_as_dict(table: np.ndarray, species: list[int], fidelities: list[str]) -> dict:
    """``{fidelity: {symbol: E0}}`` view of an E0 table, for reports and files."""
    return {
        name: {chemical_symbols[z]: float(table[f, k]) for k, z in enumerate(species)}
        for f, name in enumerate(fidelities)
    }
