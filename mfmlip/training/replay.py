"""Replay for fine-tuning (``training.replay``): structures labelled by the original model.

Fine-tuning a universal model on a few structures at new fidelities makes it
forget what it knew (catastrophic forgetting). Replay mixes into training
structures labelled at the original's own fidelities; MACE's multi-head
fine-tuning replays a subset of the foundation's training data (Batatia et
al., "A foundation model for atomistic materials chemistry", 2024). Here the
labels come from the original model itself, evaluated once before training
(a form of self-distillation), so no training data of the original is needed.

Units: eV, eV/Angstrom, eV/Angstrom^3.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.collections import g2
from ase.data import chemical_symbols, reference_states

from mfmlip import keys as K
from mfmlip.data.structures import Structure, read_structures, unlabelled_structure
from mfmlip.model.inference import Predictor
from mfmlip.training.config import ConfigError, ReplayConfig, data_file

ASE_CRYSTAL_ATOMS = 16  # elemental crystals are repeated to at least this many atoms


def replay_splits(replay: ReplayConfig, model, original: list[str], own_train: list[Structure], species: list[int],
                  root: Path, batch_size: int = 8, reader=read_structures) -> dict[str, list[Structure]]:
    """Train and val replay structures, each geometry labelled by ``model`` at every replay fidelity.

    Parameters
    ----------
    replay : the ``training.replay`` section.
    model : the original model (before fine-tuning; new fidelities may have been added), at the training dtype.
    original : the fidelities the original model was trained on: the default ``replay.fidelities``.
    own_train : the user's training structures (geometries for ``structures: training``).
    species : the data's atomic numbers (elements of ``structures: ase``).

    Raises
    ------
    ConfigError
        A replay fidelity the model does not have, ``structures: files`` without
        files, or replay structures with elements the model does not know.
    """
    fidelities = replay.fidelities or list(original)
    unknown = [f for f in fidelities if f not in original]
    if unknown:
        raise ConfigError(f"training.replay.fidelities: {unknown} are not fidelities of the init_from model "
                          f"({original})")
    geometries = _geometries(replay, own_train, species, root, reader)
    rng = np.random.default_rng(replay.seed)
    picked = [geometries[i] for i in rng.permutation(len(geometries))[: replay.max_structures]]
    foreign = sorted({int(z) for s in picked for z in s.atomic_numbers} - set(model.species))
    if foreign:
        raise ConfigError(f"training.replay: structures with elements {foreign} (atomic numbers) "
                          "the init_from model does not know")
    n_val = int(round(replay.val * len(picked))) if len(picked) > 1 else 0
    parts = {"val": picked[:n_val], "train": picked[n_val:]}
    return {k: [s for f in fidelities for s in label(model, v, f, batch_size)] for k, v in parts.items()}


def _geometries(replay: ReplayConfig, own_train, species, root, reader) -> list[Structure]:
    if replay.structures == "training":
        return list(own_train)
    if replay.structures == "ase":
        return ase_structures(species, seed=replay.seed)
    if not replay.files:
        raise ConfigError("training.replay.structures is 'files' but training.replay.files is empty")
    return [s for f in replay.files for s in reader(data_file(root, f.path), f.index, fidelity="replay",
                                                     allow_missing_labels=True)]


def ase_structures(species: list[int], seed: int = 0, rattle: float = 0.05) -> list[Structure]:
    """Structures shipped with ASE made only of ``species``: the G2 molecules
    (Curtiss et al., J. Chem. Phys. 106, 1063 (1997)) and each element's
    reference crystal (``ase.build.bulk``), rattled by ``rattle`` Angstrom."""
    allowed = set(species)
    frames = []
    for name in g2.names:
        atoms = g2[name]
        if set(atoms.numbers) <= allowed and len(atoms) > 1:
            frames.append(atoms)
    for z in species:
        if reference_states[z] and reference_states[z].get("symmetry") in ("fcc", "bcc", "hcp", "diamond", "sc"):
            crystal = bulk(chemical_symbols[z])
            frames.append(crystal.repeat(_repeats(crystal)))
    out = []
    for k, atoms in enumerate(frames):
        atoms = atoms.copy()
        atoms.rattle(rattle, seed=seed + k)
        out.append(unlabelled_structure(atoms, source=f"ASE structure {atoms.get_chemical_formula()}"))
    return out


def _repeats(atoms: Atoms) -> int:
    n = 1
    while len(atoms) * n**3 < ASE_CRYSTAL_ATOMS:
        n += 1
    return n


def label(model, structures: list[Structure], fidelity: str, batch_size: int = 8) -> list[Structure]:
    """Copies of ``structures`` at ``fidelity`` with the model's energy, forces and,
    for 3D-periodic ones, stress as labels."""
    out = []
    stress = any(s.pbc.all() for s in structures)
    for chunk, batch, pred in Predictor(model, fidelity).predict(structures, batch_size, stress=stress):
        forces = np.split(pred[K.FORCES].double().cpu().numpy(), np.cumsum(batch[K.N_ATOMS].tolist())[:-1])
        for i, (s, f) in enumerate(zip(chunk, forces, strict=True)):
            periodic = bool(s.pbc.all())
            out.append(replace(
                s, fidelity=fidelity, energy=float(pred[K.ENERGY][i]), forces=f,
                stress=pred[K.STRESS][i].double().cpu().numpy() if periodic else None,
                source=f"replay at {fidelity}: {s.source}",
            ))
    return out
