"""Encode structures as fixed-length vectors for :mod:`mfmlip.sampling.select`.

The default encoder is a trained mfmlip model: the invariant (l = 0) node
features after its last interaction block (``node_features``, shape
``(n_atoms, channels)``), averaged over the atoms of each structure, and
optionally also over the atoms of each species. Being built from scalars and
averaged, the vector is invariant to rotations, translations and the order of
the atoms. Any function ``atoms -> 1-D array`` can be used instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols

from mfmlip import keys as K
from mfmlip.data.structures import DataError, Structure, unlabelled_structure
from mfmlip.model.inference import Predictor, resolve_model
from mfmlip.model.interface import Potential
from mfmlip.sampling.select import POOLINGS



def _as_structures(items: Iterable) -> list[Structure]:
    if isinstance(items, (Atoms, Structure)):
        items = [items]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Structure):
            out.append(item)
        elif isinstance(item, Atoms):
            out.append(unlabelled_structure(item, source=f"structure {i}", frame=i))
        else:
            raise TypeError(f"structure {i}: expected ase.Atoms or mfmlip Structure, got {type(item).__name__}")
    if not out:
        raise ValueError("no structures to encode")
    return out


def _as_atoms(item) -> Atoms:
    if isinstance(item, Atoms):
        return item
    return Atoms(numbers=item.atomic_numbers, positions=item.positions, cell=item.cell, pbc=item.pbc)


def _check_species(structures: list[Structure], model) -> None:
    known = set(model.species)
    for s in structures:
        unknown = set(np.unique(s.atomic_numbers).tolist()) - known
        if unknown:
            raise DataError(
                f"{s.source}: element(s) {sorted(chemical_symbols[z] for z in unknown)} unknown to the "
                f"model; it knows {[chemical_symbols[z] for z in model.species]}"
            )


def pool(features: torch.Tensor, graph: torch.Tensor, n_graphs: int, species: torch.Tensor | None = None,
         n_species: int = 0) -> torch.Tensor:
    """Average per-atom features per structure.

    Parameters
    ----------
    features : (n_atoms, dim) node features.
    graph : (n_atoms,) long, structure of each atom.
    species : (n_atoms,) long species index; if given, the per-species means
        (zeros for a species a structure lacks) are appended.

    Returns
    -------
    (n_graphs, dim) or, with species, (n_graphs, dim * (1 + n_species)).
    """
    def mean(index, n_bins):
        total = torch.zeros(n_bins, features.shape[1], dtype=features.dtype).index_add(0, index, features)
        ones = torch.ones_like(index, dtype=features.dtype)
        count = torch.zeros(n_bins, dtype=features.dtype).index_add(0, index, ones)
        return total / count.clamp(min=1)[:, None]

    parts = [mean(graph, n_graphs)]
    if species is not None:
        parts.append(mean(graph * n_species + species, n_graphs * n_species).reshape(n_graphs, -1))
    return torch.cat(parts, dim=1)


def encode(
    structures: Iterable,
    model,
    fidelity: str | None = None,
    batch_size: int = 256,
    max_atoms: int = 8192,
    pooling: str = "mean",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """One fixed-length vector per structure.

    Parameters
    ----------
    structures : ``ase.Atoms`` or :class:`mfmlip.data.structures.Structure` objects
        (labels are ignored).
    model : an :class:`~mfmlip.model.potential.MFPotential`, the path of a model
        file (``model.pt``), or any callable ``atoms -> 1-D array``.
    fidelity : fidelity to run the model at (node features depend on it unless
        the model uses ``heads``); default the model's first one. Ignored for a callable.
    batch_size, max_atoms : at most this many structures and (unless a single
        structure is larger) atoms per forward pass.
    pooling : ``"mean"``: mean node features, dim ``channels``; ``"species"``:
        that, followed by the mean over the atoms of each of the model's species
        (in the order of ``model.species``; zeros where a structure has none),
        dim ``channels * (1 + n_species)``.
    device : torch device of the forward passes.
    progress : show a tqdm bar (on stderr).

    Returns
    -------
    (n_structures, dim) float64 array.

    Raises
    ------
    DataError
        Non-finite coordinates, or an element the model does not know (the
        message names the structure, e.g. ``file: frame k``).
    ValueError
        Unknown fidelity or pooling, vectors of different lengths from a
        callable, or a non-finite vector.

    Examples
    --------
    >>> from ase.build import molecule
    >>> from mfmlip.model import MFPotential, ModelSpec
    >>> model = MFPotential(ModelSpec(species=[1, 6, 8], fidelities=["PBE"], channels=8, num_layers=2))
    >>> encode([molecule("CH3OH"), molecule("H2O")], model).shape
    (2, 8)
    """
    if isinstance(model, (str, Path, Potential)):
        structures = _as_structures(structures)
        return _encode_with_model(structures, model, fidelity, batch_size, max_atoms, pooling, device, progress)
    if callable(model):
        items = [structures] if isinstance(structures, (Atoms, Structure)) else list(structures)
        return _encode_with_function(items, model, progress)
    raise TypeError(f"model must be an MFPotential, a model file or a callable, got {type(model).__name__}")


def _bar(total: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="structure", desc="encoding", disable=not progress, mininterval=0.5)


def _encode_with_model(structures, model, fidelity, batch_size, max_atoms, pooling, device,
                       progress) -> np.ndarray:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")
    model = resolve_model(model, device)
    predictor = Predictor(model, fidelity if fidelity is not None else model.fidelities[0], device)
    _check_species(structures, predictor.model)
    vectors = []
    n_species = len(predictor.model.species)
    with _bar(len(structures), progress) as bar:
        for chunk, batch, pred in predictor.predict(structures, batch_size, max_atoms, forces=False):
            species = predictor.model.species_index(batch[K.ATOMIC_NUMBERS]).cpu() if pooling == "species" else None
            pooled = pool(pred[K.NODE_FEATURES].cpu(), batch[K.BATCH].cpu(), len(chunk), species, n_species)
            vectors.append(pooled.double().numpy())
            bar.update(len(chunk))
    out = np.concatenate(vectors)
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if bad.size:
        raise ValueError(f"{structures[bad[0]].source}: the model's features are not finite "
                         f"({bad.size} structure(s) affected)")
    return out


def _encode_with_function(items: list, function: Callable, progress: bool) -> np.ndarray:
    if not items:
        raise ValueError("no structures to encode")
    vectors = []
    with _bar(len(items), progress) as bar:
        for i, item in enumerate(items):
            v = np.asarray(function(_as_atoms(item)), dtype=np.float64).ravel()
            where = getattr(item, "source", f"structure {i}")
            if vectors and v.shape != vectors[0].shape:
                raise ValueError(f"{where}: encoder returned {v.size} values, structure 0 gave {vectors[0].size}")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"{where}: encoder returned NaN or inf")
            vectors.append(v)
            bar.update(1)
    return np.stack(vectors)
