"""Registry of the data keys shared by the data pipeline, the model and the loss.

Every tensor that flows through mfmlip is stored in a ``dict`` under one of
these keys. Shapes use ``n_atoms`` (atoms in the batch), ``n_edges`` and
``n_graphs`` (structures in the batch). Units: Angstrom, eV, eV/Angstrom,
eV/Angstrom^3 (stress, ASE sign convention: ``stress = dE/d(strain) / V``).
"""

# --- inputs -------------------------------------------------------------
POSITIONS = "positions"  # (n_atoms, 3) float, Angstrom
ATOMIC_NUMBERS = "atomic_numbers"  # (n_atoms,) long
CELL = "cell"  # (n_graphs, 3, 3) float, Angstrom, rows are lattice vectors
PBC = "pbc"  # (n_graphs, 3) bool
EDGE_INDEX = "edge_index"  # (2, n_edges) long: [centre i, neighbour j]
SHIFTS = "shifts"  # (n_edges, 3) float integer cell shifts: r_ij = r_j - r_i + S @ cell
BATCH = "batch"  # (n_atoms,) long, index of the structure of each atom
N_ATOMS = "n_atoms"  # (n_graphs,) long
FIDELITY = "fidelity"  # (n_graphs,) long, index into the model's fidelity names
LABEL_FIDELITY = "label_fidelity"  # (n_graphs,) long, index of each label's fidelity in a list of names (evaluation)
STRUCTURE_INDEX = "structure_index"  # (n_graphs,) long, position in the dataset (for messages)

# --- labels (targets) and their masks ------------------------------------
ENERGY = "energy"  # (n_graphs,) float, eV
FORCES = "forces"  # (n_atoms, 3) float, eV/Angstrom
STRESS = "stress"  # (n_graphs, 3, 3) float, eV/Angstrom^3
ENERGY_MASK = "energy_mask"  # (n_graphs,) bool, True where the energy label exists
FORCES_MASK = "forces_mask"  # (n_atoms,) bool, True where the atom's force label exists
STRESS_MASK = "stress_mask"  # (n_graphs,) bool, True where the stress label exists

# --- model outputs (same names and units as the labels) -----------------
ATOMIC_ENERGY = "atomic_energy"  # (n_atoms,) float, eV, including E0
NODE_FEATURES = "node_features"  # (n_atoms, dim) invariant features after the last block

# --- floating dtypes mfmlip computes in (names, as configs and the CLI take them) ---
FLOAT_DTYPES = ("float32", "float64")
