"""Reading labelled structures, building graphs, E0 fits, filters and splits."""

from mfmlip.data.e0 import build_e0_table, fit_e0
from mfmlip.data.graph import atoms_to_batch, collate, neighbor_list, structure_to_graph, to_device
from mfmlip.data.selection import filter_structures, split_indices
from mfmlip.data.structures import DataError, Structure, read_structures, structure_from_atoms, unlabelled_structure


__all__ = [
    "DataError", "Structure", "read_structures", "structure_from_atoms", "unlabelled_structure", "neighbor_list",
    "structure_to_graph", "collate", "to_device", "fit_e0", "build_e0_table",
    "filter_structures", "split_indices", "atoms_to_batch",
]
