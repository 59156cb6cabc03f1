"""Reading labelled structures, building graphs, E0 fits, filters and splits."""

from mfmlip.data.e0 import build_e0_table, fit_e0
from mfmlip.data.graph import collate, neighbor_list, structure_to_graph, to_device
from mfmlip.data.selection import filter_structures, split_indices
from mfmlip.data.structures import DataError, Structure, read_structures, structure_from_atoms


def atoms_to_batch(atoms, cutoff: float, fidelity_index: int = 0) -> dict:
    """One ``ase.Atoms`` (no labels needed) as a one-graph batch for the model."""
    s = structure_from_atoms(atoms, fidelity="?", allow_missing_labels=True)
    return collate([structure_to_graph(s, cutoff, fidelity_index)])


__all__ = [
    "DataError", "Structure", "read_structures", "structure_from_atoms", "neighbor_list",
    "structure_to_graph", "collate", "to_device", "fit_e0", "build_e0_table",
    "filter_structures", "split_indices", "atoms_to_batch",
]
