"""A model at one fidelity as a file that ``torch`` alone loads (``torch.export``, a ``.pt2``).

:func:`export_model` traces :class:`FixedFidelity` (energy, forces and
stress of one structure, the derivatives included) into an
``ExportedProgram`` and saves it with ``torch.export.save``; ``torch.export.load``
reads it back without mfmlip, e3nn or vesin, and a C++ program can compile
it with AOTInductor (``torch._inductor.aoti_compile_and_package``) for
libtorch. The derivatives are part of the graph: ``torch.export`` cannot yet
trace ``torch.autograd.grad`` itself (pytorch/pytorch#146719), so the
forward and backward passes are first unrolled into one graph of ATen
operations by ``make_fx`` (the route NequIP takes), which is then exported
with dynamic numbers of atoms and edges.

Input contract (one structure; tensors in the file's dtype, integers int64)::

    positions      (n_atoms, 3)  Angstrom
    cell           (3, 3)        Angstrom, rows are lattice vectors
    atomic_numbers (n_atoms,)    elements among the file's species
    edge_index     (2, n_edges)  [centre i, neighbour j]: every ordered pair
                                 (both i->j and j->i) within the cutoff
    shifts         (n_edges, 3)  integer cell shifts (as floats):
                                 r_ij = r_j - r_i + shifts @ cell

Outputs: ``energy`` () eV, ``forces`` (n_atoms, 3) eV/Angstrom, ``stress``
(3, 3) eV/Angstrom^3 (ASE sign, ``-virial / |det cell|``; meaningful for a
3D-periodic cell), ``atomic_energy`` (n_atoms,) eV, ``atomic_virial``
(n_atoms, 3, 3) eV (see :mod:`mfmlip.model.virial`). The caller builds the
neighbour list (e.g. vesin, ASE's ``neighbor_list("ijS", ...)``, or a LAMMPS
full neighbour list with ghost atoms mapped to shifts); the file's
``mfmlip.json`` extra file holds the cutoff, species, fidelity and dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from mfmlip import keys as K
from mfmlip.data.graph import atoms_to_batch
from mfmlip.model.compiled import traceable
from mfmlip.model.inference import resolve_model
from mfmlip.model.interface import Potential
from mfmlip.model.virial import energy_forces_virials

INPUTS = ("positions", "cell", "atomic_numbers", "edge_index", "shifts")
OUTPUTS = ("energy", "forces", "stress", "atomic_energy", "atomic_virial")
METADATA = "mfmlip.json"  # the extra file of the .pt2 with the contract and the model's facts


class FixedFidelity(torch.nn.Module):
    """A potential bound to one fidelity, with the tensor-only signature of the
    module docstring's contract (what the exported file computes)."""

    def __init__(self, model: Potential, fidelity: str | None):
        super().__init__()
        self.model, self.fidelity_index = model, model.fidelity_index(fidelity)

    def forward(self, positions, cell, atomic_numbers, edge_index, shifts):
        batch = {
            K.POSITIONS: positions, K.CELL: cell[None], K.ATOMIC_NUMBERS: atomic_numbers,
            K.EDGE_INDEX: edge_index, K.SHIFTS: shifts, K.BATCH: torch.zeros_like(atomic_numbers),
            K.N_ATOMS: torch.ones(1, dtype=torch.long, device=positions.device),  # only its length is read
            K.FIDELITY: torch.full((1,), self.fidelity_index, dtype=torch.long, device=positions.device),
        }
        out = energy_forces_virials(self.model, batch)
        stress = -out["virial"][0] / torch.linalg.det(cell).abs()
        return out[K.ENERGY][0], out[K.FORCES], stress, out[K.ATOMIC_ENERGY], out["atomic_virial"]


def example_inputs(model: Potential, device="cpu") -> tuple:
    """Inputs of the contract for a small rattled cell of the model's first two
    species (a trace needs one; its sizes are made dynamic)."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=0)
    atoms.numbers[:] = model.species[0]
    atoms.numbers[::3] = model.species[-1]
    batch = atoms_to_batch(atoms, model.cutoff, 0, min_distance=0.0)
    dtype = model.dtype
    return (batch[K.POSITIONS].to(device, dtype), batch[K.CELL][0].to(device, dtype),
            batch[K.ATOMIC_NUMBERS].to(device), batch[K.EDGE_INDEX].to(device), batch[K.SHIFTS].to(device, dtype))


def export_model(model, fidelity: str | None, path: str | Path, device: str | torch.device = "cpu",
                 dtype=None) -> Path:
    """Write ``model`` at ``fidelity`` as a ``torch.export`` file (``.pt2``).

    Parameters
    ----------
    model : model file path or :class:`~mfmlip.model.interface.Potential`.
    fidelity : the level of theory; required (the file holds only this one).
    path : output file, conventionally ``*.pt2``.
    device, dtype : of the traced graph; dtype default float64 (as ``mfmlip md``).

    Returns
    -------
    ``path``. Load it with :func:`load_exported` or ``torch.export.load(path).module()``.

    Raises
    ------
    ValueError
        Missing or unknown fidelity, or an unsupported dtype.
    FileNotFoundError, ModelFileError
        As :func:`mfmlip.model.serialization.load_model`.
    """
    model = resolve_model(model, device, dtype or "float64")
    module = FixedFidelity(model, fidelity).eval()
    inputs = example_inputs(model, device)
    with traceable(model):
        graph = make_fx(module, tracing_mode="symbolic", _allow_non_fake_inputs=True,
                        _error_on_data_dependent_ops=True)(*[x.clone() for x in inputs])
        atoms, edges = torch.export.Dim("n_atoms", min=1), torch.export.Dim("n_edges", min=1)
        shapes = ({0: atoms}, None, {0: atoms}, {1: edges}, {0: edges})
        program = torch.export.export(graph, inputs, dynamic_shapes=shapes, strict=False)
    facts = {"format": "mfmlip-export", "version": 1, "fidelity": fidelity, "cutoff_A": model.cutoff,
             "species": model.species, "dtype": str(model.dtype).replace("torch.", ""), "inputs": list(INPUTS),
             "outputs": list(OUTPUTS), "units": {"energy": "eV", "forces": "eV/A", "stress": "eV/A^3 (ASE sign)",
                                                 "atomic_virial": "eV", "positions": "A"}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path, extra_files={METADATA: json.dumps(facts)})
    return path


def load_exported(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """``(module, facts)`` of a file written by :func:`export_model`; the module
    maps the contract's inputs to its outputs (a tuple in :data:`OUTPUTS` order).

    Raises
    ------
    FileNotFoundError
        No such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} not found")
    extra = {METADATA: ""}
    program = torch.export.load(path, extra_files=extra)
    return program.module(), json.loads(extra[METADATA])
