"""An mfmlip model as the interaction of a LAMMPS run, through ``fix external``.

:class:`MFFixExternal` defines ``fix ID all external pf/callback 1 1`` in a
running :class:`lammps.lammps` instance and registers a Python callback: at
every step LAMMPS hands over the positions of its atoms, and the callback
returns the model's forces, total and per-atom energies and the global and
per-atom virials, at one fidelity. LAMMPS's own integrators, thermostats,
barostats, fixes and computes then work as with any other pair style.

Conventions (LAMMPS ``units metal``, one MPI rank):

* the cell rows are ``a = (lx, 0, 0)``, ``b = (xy, ly, 0)``,
  ``c = (xz, yz, lz)``; a direction is periodic where LAMMPS's boundary is
  ``p`` (shrink-wrapped and fixed boundaries are not periodic);
* energies eV, forces eV/Angstrom, virials eV in LAMMPS's order xx yy zz
  xy xz yz, from :func:`mfmlip.model.virial.energy_forces_virials`: for a
  3D-periodic cell the global virial is ``-V * stress`` with the stress of
  :class:`mfmlip.MFCalculator` (ASE sign); the per-atom virials sum to it.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from ase.data import atomic_masses, atomic_numbers, chemical_symbols

from mfmlip import keys as K
from mfmlip.data.graph import MIN_DISTANCE
from mfmlip.data.structures import DataError, Structure
from mfmlip.lammps.library import check_one_rank
from mfmlip.model.inference import Predictor
from mfmlip.model.virial import energy_forces_virials

#: the LAMMPS unit system the driver is written for (eV, Angstrom, ps, g/mol)
UNITS = "metal"
MASS_TOLERANCE = 0.1  # g/mol: a type's mass names the element within this
VOIGT = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))  # LAMMPS's virial order
_DOUBLE_P = ctypes.POINTER(ctypes.c_double)


def lammps_outputs(model, batch: dict) -> dict:
    """What fix external takes, for a one-structure batch (:func:`~mfmlip.model.virial.energy_forces_virials`).

    Returns
    -------
    dict of float64 numpy arrays: ``energy`` () eV, ``atomic_energy`` (n_atoms,)
    eV, ``forces`` (n_atoms, 3) eV/Angstrom, ``virial`` (6,) eV and
    ``atomic_virial`` (n_atoms, 6) eV in LAMMPS's order xx yy zz xy xz yz.
    """
    out = {k: v.double().cpu().numpy() for k, v in energy_forces_virials(model, batch).items()}
    rows, cols = np.array(VOIGT).T
    return {"energy": float(out[K.ENERGY].sum()), "atomic_energy": out[K.ATOMIC_ENERGY], "forces": out[K.FORCES],
            "virial": out["virial"][0][rows, cols], "atomic_virial": out["atomic_virial"][:, rows, cols]}


def lammps_cell(lmp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(origin (3,), cell (3, 3) rows a b c, pbc (3,))`` of a LAMMPS box, Angstrom."""
    boxlo, boxhi, xy, yz, xz, periodicity, _ = lmp.extract_box()
    lx, ly, lz = np.subtract(boxhi, boxlo)
    cell = np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])
    return np.asarray(boxlo, dtype=np.float64), cell, np.asarray(periodicity, dtype=bool)


def elements_from_masses(masses) -> list[str]:
    """Element symbols of LAMMPS atom types 1..n from their masses (g/mol).

    Raises
    ------
    DataError
        A type whose mass is unset or matches no element within
        :data:`MASS_TOLERANCE`; the message asks for explicit types.
    """
    symbols = []
    for t, mass in enumerate(masses, start=1):
        z = int(np.argmin(np.abs(atomic_masses[1:] - mass))) + 1
        if not mass > 0 or abs(atomic_masses[z] - mass) > MASS_TOLERANCE:
            raise DataError(f"atom type {t}: mass {mass:g} g/mol names no element (within {MASS_TOLERANCE} g/mol); "
                            "give the elements of the types explicitly (--types, e.g. \"O H Na Cl\")")
        symbols.append(chemical_symbols[z])
    return symbols


def check_elements(elements, species) -> None:
    """Refuse a symbol that is not an element, or one the model (``species``, atomic numbers) lacks.

    Raises
    ------
    DataError
        Not an element symbol.
    ValueError
        An element the model does not know; the message lists the ones it knows.
    """
    bad = [s for s in elements if s not in atomic_numbers]
    if bad:
        raise DataError(f"atom types: {bad} are not element symbols (one element per type, in type order, "
                        "e.g. \"O H Na Cl\")")
    unknown = sorted({s for s in elements if atomic_numbers[s] not in species})
    if unknown:
        raise ValueError(f"element(s) {unknown} of the atom types unknown to this model; it knows "
                         f"{[chemical_symbols[z] for z in species]}")


def type_atomic_numbers(elements, n_types: int, species) -> np.ndarray:
    """(n_types + 1,) atomic number of each LAMMPS type (index 0 unused).

    Raises
    ------
    DataError
        Fewer or more elements than atom types, or a symbol that is not an element.
    ValueError
        An element the model does not know.
    """
    elements = list(elements)
    if len(elements) != n_types:
        raise DataError(f"the box has {n_types} atom type(s) but {len(elements)} element(s) were given "
                        f"({' '.join(elements) or 'none'}): give one element per type, in type order")
    check_elements(elements, species)
    return np.array([0] + [atomic_numbers[s] for s in elements], dtype=np.int64)


class MFFixExternal:
    """An mfmlip model at one fidelity, driving a LAMMPS instance through ``fix external``.

    Defines ``fix FIX_ID all external pf/callback 1 1`` with ``fix_modify
    FIX_ID energy yes virial yes``, so LAMMPS's ``pe``, ``press``, ``compute
    pe/atom`` and ``compute stress/atom`` include the model. Keep the object
    alive while LAMMPS runs (LAMMPS calls back into it).

    Parameters
    ----------
    lmp : a :class:`lammps.lammps` instance (:func:`mfmlip.lammps.open_lammps`)
        on one MPI rank, ``units metal``, with its box and atoms already made.
    model : model file path or :class:`~mfmlip.model.interface.Potential`.
    fidelity : the level of theory; required.
    elements : element symbol of each atom type, in type order; default:
        read from the type masses (:func:`elements_from_masses`).
    device, dtype, min_distance : as :class:`~mfmlip.model.inference.Predictor`
        (``min_distance`` in Angstrom).
    fix_id : the LAMMPS ID of the fix.

    Raises
    ------
    ValueError
        Missing or unknown fidelity, an element the model does not know,
        units other than metal, no box yet, or more than one MPI rank.
    DataError
        An atom type without an element, or a symbol that is not an element.

    Examples
    --------
    >>> from mfmlip.lammps import open_lammps, MFFixExternal   # doctest: +SKIP
    >>> lmp = open_lammps(log=None)
    >>> lmp.commands_string("units metal\\nread_data water.data\\nvelocity all create 300 1")
    >>> fix = MFFixExternal(lmp, "model.pt", fidelity="MP2", elements=["O", "H"])
    >>> lmp.commands_string("fix nvt all nvt temp 300 300 0.05\\nrun 100")
    """

    def __init__(self, lmp, model, fidelity: str | None, elements=None, device: str | torch.device = "cpu",
                 dtype=None, min_distance: float = MIN_DISTANCE, fix_id: str = "mfmlip"):
        check_one_rank(lmp)
        units = lmp.extract_global("units")
        if units != UNITS:
            raise ValueError(f"LAMMPS units {units!r}: the mfmlip model needs 'units {UNITS}' (eV, Angstrom, ps)")
        if not lmp.extract_setting("box_exist"):
            raise ValueError("the LAMMPS box does not exist yet: read_data or create_box first")
        self.predictor = Predictor(model, fidelity, device, dtype, min_distance)
        n_types = lmp.extract_global("ntypes")
        if elements is None:
            elements = elements_from_masses(self._masses(lmp, n_types))
        self.elements = list(elements)
        self.type_numbers = type_atomic_numbers(self.elements, n_types, self.predictor.model.species)
        self.lmp, self.fix_id, self.error, self.calls = lmp, fix_id, None, 0
        # a callback cannot raise into LAMMPS: on an error it sets this variable and fix halt stops the run
        self._halt = f"{fix_id}_error"
        lmp.commands_string(f"fix {fix_id} all external pf/callback 1 1\n"
                            f"fix_modify {fix_id} energy yes virial yes\n"
                            f"variable {self._halt} internal 0\n"
                            f"fix {fix_id}_halt all halt 1 v_{self._halt} > 0 error hard message yes")
        lmp.set_fix_external_callback(fix_id, self._callback)

    @staticmethod
    def _masses(lmp, n_types: int) -> np.ndarray:
        masses = lmp.numpy.extract_atom("mass")
        if masses is None:
            raise DataError("the atom style has per-atom masses only; give the elements of the types explicitly")
        return np.asarray(masses[1:n_types + 1], dtype=np.float64)

    @property
    def fidelity(self) -> str:
        return self.predictor.fidelity

    def compute(self, positions: np.ndarray, types: np.ndarray) -> dict:
        """Model outputs (see :func:`lammps_outputs`) for the current LAMMPS box.

        Parameters
        ----------
        positions : (n_atoms, 3) Angstrom, LAMMPS's local atoms.
        types : (n_atoms,) LAMMPS atom types.

        Raises
        ------
        DataError
            Atoms closer than ``min_distance`` or non-finite positions.
        """
        origin, cell, pbc = lammps_cell(self.lmp)
        structure = Structure(positions=np.asarray(positions, dtype=np.float64) - origin,
                              atomic_numbers=self.type_numbers[types], cell=cell, pbc=pbc, fidelity=self.fidelity,
                              source=f"LAMMPS step {self.lmp.extract_global('ntimestep')} (atoms by local index)")
        if not np.isfinite(structure.positions).all():
            raise DataError(f"{structure.source}, field 'positions': contains NaN or inf")
        return lammps_outputs(self.predictor.model, self.predictor.batch([structure]))

    def _callback(self, caller, ntimestep, nlocal, tag, x, f) -> None:
        """LAMMPS's per-step call: fill ``f`` and set energies and virials."""
        try:
            types = self.lmp.numpy.extract_atom("type")[:nlocal]
            out = self.compute(x[:nlocal], types)
        except Exception as err:  # noqa: BLE001 - kept for the caller; fix halt ends the run after this step
            self.error = self.error or err  # the first one
            f[:] = 0.0
            self.lmp.set_internal_variable(self._halt, 1)
            return
        f[:] = out["forces"]
        self.lmp.fix_external_set_energy_global(self.fix_id, out["energy"])
        self.lmp.fix_external_set_virial_global(self.fix_id, out["virial"].tolist())
        self._set_peratom(out["atomic_energy"], out["atomic_virial"])
        self.calls += 1

    def _set_peratom(self, energies: np.ndarray, virials: np.ndarray) -> None:
        """Per-atom energies (n,) and virials (n, 6), eV, by pointer: the module's
        wrappers copy element by element in Python. LAMMPS ignores them on steps
        that do not need them."""
        lib, handle, fix_id = self.lmp.lib, self.lmp.lmp, self.fix_id.encode()
        energies, virials = np.ascontiguousarray(energies), np.ascontiguousarray(virials)
        rows = (virials.ctypes.data + virials.strides[0] * np.arange(len(virials))).astype(np.uintp)
        lib.lammps_fix_external_set_energy_peratom(handle, fix_id, energies.ctypes.data_as(_DOUBLE_P))
        lib.lammps_fix_external_set_virial_peratom(handle, fix_id, rows.ctypes.data_as(ctypes.POINTER(_DOUBLE_P)))
