"""Structures to graphs (neighbour lists by vesin) and graphs to batches.

A graph is a ``dict[str, torch.Tensor]`` keyed by :mod:`mfmlip.keys`. Edge
vectors are not stored: the model computes ``r_j - r_i + shifts @ cell`` in
torch, so that forces and stress come from autograd.
"""

from __future__ import annotations

import numpy as np
import torch
import vesin

from mfmlip import keys as K
from mfmlip.data.structures import DataError, Structure, unlabelled_structure

MIN_DISTANCE = 0.1  # Angstrom: closer atoms are refused (input error, never a NaN deep in the model)


def neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray]:
    """Full neighbour list within ``cutoff`` (Angstrom) for any cell shape.

    Cells smaller than the cutoff are fine (several images of an atom are
    neighbours). Lattice vectors along non-periodic directions are ignored, so
    a slab or wire may have zero vectors there (zero cell volume).

    Returns
    -------
    edge_index : (2, n_edges) int64, rows ``[i, j]`` (centre, neighbour)
    shifts : (n_edges, 3) int64 cell shifts, ``r_ij = r_j - r_i + shifts @ cell``

    Raises
    ------
    DataError
        The lattice vectors of the periodic directions are zero or linearly
        dependent (a periodic cell of zero volume).
    """
    pbc = np.asarray(pbc, dtype=bool)
    box = np.asarray(cell, dtype=np.float64)
    if not pbc.any():
        box = np.zeros((3, 3))
    else:
        periodic = box[pbc]
        if np.linalg.svd(periodic, compute_uv=False).min() < 1e-6:
            axes = "".join("abc"[k] for k in np.flatnonzero(pbc))
            raise DataError(
                f"periodic cell of zero volume: the lattice vectors of the periodic directions ({axes}) "
                f"are zero or linearly dependent: {periodic.tolist()}"
            )
    nl = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, shifts = nl.compute(
        points=np.asarray(positions, dtype=np.float64),
        box=box,
        periodic=pbc.tolist(),
        quantities="ijS",
    )
    edge_index = np.stack([i, j]).astype(np.int64)
    return edge_index, shifts.astype(np.int64)


def check_min_distance(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, edge_index: np.ndarray, shifts: np.ndarray,
    min_distance: float, source: str,
) -> None:
    """Raise if two atoms of the edge list (or an atom and its periodic image)
    are closer than ``min_distance`` (Angstrom)."""
    if min_distance <= 0 or edge_index.shape[1] == 0:
        return
    box = np.asarray(cell, dtype=np.float64) if np.any(pbc) else np.zeros((3, 3))
    i, j = edge_index
    d = np.linalg.norm(positions[j] - positions[i] + shifts @ box, axis=1)
    k = int(np.argmin(d))
    if d[k] < min_distance:
        pair = f"atom {i[k]} and its periodic image" if i[k] == j[k] else f"atoms {i[k]} and {j[k]}"
        raise DataError(
            f"{source}, field 'positions': {pair} closer than min_distance={min_distance:g} A "
            f"(closest {d[k]:.3f} A); overlapping atoms are unphysical and the model cannot be trusted there"
        )


def structure_to_graph(
    structure: Structure, cutoff: float, fidelity_index: int, min_distance: float = MIN_DISTANCE
) -> dict:
    """Build the graph of one structure, labels and masks included.

    ``fidelity_index`` is the position of ``structure.fidelity`` in the model's
    fidelity names. Missing labels are zero-filled with a False mask. An atom
    with no neighbour within the cutoff simply has no edges.

    Raises
    ------
    DataError
        A periodic cell of zero volume (field 'cell'), or two atoms closer
        than ``min_distance`` Angstrom (field 'positions'; 0 turns the check off).
    """
    geometry = structure.positions, structure.cell, structure.pbc
    try:
        edge_index, shifts = neighbor_list(*geometry, cutoff)
    except DataError as err:
        raise DataError(f"{structure.source}, field 'cell': {err}") from None
    # pairs beyond the cutoff are not in the edge list
    close = neighbor_list(*geometry, min_distance) if min_distance > cutoff else (edge_index, shifts)
    check_min_distance(*geometry, *close, min_distance, structure.source)
    n = structure.n_atoms
    has_e = bool(np.isfinite(structure.energy))
    return {
        K.POSITIONS: torch.as_tensor(structure.positions, dtype=torch.float64),
        K.ATOMIC_NUMBERS: torch.as_tensor(structure.atomic_numbers, dtype=torch.long),
        K.CELL: torch.as_tensor(structure.cell, dtype=torch.float64).unsqueeze(0),
        K.PBC: torch.as_tensor(structure.pbc, dtype=torch.bool).unsqueeze(0),
        K.EDGE_INDEX: torch.as_tensor(edge_index),
        K.SHIFTS: torch.as_tensor(shifts, dtype=torch.float64),
        K.N_ATOMS: torch.tensor([n]),
        K.FIDELITY: torch.tensor([fidelity_index]),
        K.ENERGY: torch.tensor([structure.energy if has_e else 0.0], dtype=torch.float64),
        K.ENERGY_MASK: torch.tensor([has_e]),
        K.FORCES: torch.as_tensor(
            structure.forces if structure.forces is not None else np.zeros((n, 3)),
            dtype=torch.float64,
        ),
        K.FORCES_MASK: torch.full((n,), structure.forces is not None),
        K.STRESS: torch.as_tensor(
            structure.stress if structure.stress is not None else np.zeros((3, 3)),
            dtype=torch.float64,
        ).unsqueeze(0),
        K.STRESS_MASK: torch.tensor([structure.stress is not None]),
    }


def collate(graphs: list[dict]) -> dict:
    """Concatenate graphs into one batch; adds ``batch`` and offsets ``edge_index``.

    Floating-point fields stay in the graphs' dtype; cast with :func:`to_device`.
    """
    batch = {key: torch.cat([g[key] for g in graphs]) for key in graphs[0] if key != K.EDGE_INDEX}
    n_atoms = batch[K.N_ATOMS]
    offsets = torch.cumsum(n_atoms, 0) - n_atoms
    batch[K.EDGE_INDEX] = torch.cat([g[K.EDGE_INDEX] + o for g, o in zip(graphs, offsets)], dim=1)
    batch[K.BATCH] = torch.repeat_interleave(torch.arange(len(graphs)), n_atoms)
    return batch


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """Move a batch to ``device``; floating-point tensors are cast to ``dtype``."""
    return {
        k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        for k, v in batch.items()
    }


def atoms_to_batch(atoms, cutoff: float, fidelity_index: int = 0, min_distance: float = MIN_DISTANCE) -> dict:
    """One ``ase.Atoms`` as a one-graph batch (labels ignored), for prediction.

    Raises
    ------
    DataError
        Non-finite positions or cell, a periodic cell of zero volume, or two
        atoms closer than ``min_distance`` Angstrom (0 turns the check off).
    """
    s = unlabelled_structure(atoms, source=f"structure {atoms.get_chemical_formula()}")
    return collate([structure_to_graph(s, cutoff, fidelity_index, min_distance)])
