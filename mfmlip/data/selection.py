"""Filters that drop frames far from the data's bulk, and train/val/test splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from mfmlip.data.e0 import composition_matrix, fit_e0
from mfmlip.data.store import take
from mfmlip.data.structures import DataError, Structure

SPLITS = ("train", "val", "test")


def energy_above_min_per_atom(structures: list[Structure]) -> np.ndarray:
    """Per-atom energy above the lowest frame, after removing composition.

    The composition part is a least-squares E0 fit over the same frames, so for
    one composition this is ``(E - E_min) / n_atoms``. NaN where no energy.
    """
    species = sorted({int(z) for s in structures for z in s.atomic_numbers})
    energies = np.array([s.energy for s in structures])
    if not np.isfinite(energies).any():
        return energies
    e0 = fit_e0(structures, species)
    n_atoms = np.array([s.n_atoms for s in structures])
    residual = (energies - composition_matrix(structures, species) @ e0) / n_atoms
    return residual - np.nanmin(residual)


def filter_structures(
    structures: list[Structure],
    max_energy_above_min_per_atom: float | None = None,
    max_abs_force: float | None = None,
) -> tuple[list[Structure], np.ndarray]:
    """Drop frames whose energy or largest force component is too high.

    Parameters
    ----------
    max_energy_above_min_per_atom : eV/atom, see :func:`energy_above_min_per_atom`.
    max_abs_force : eV/Angstrom, on the largest |force component| of a frame.

    Returns
    -------
    kept structures (a list, or for a store's frames a view of the kept ones),
    and the (n_dropped,) indices of the dropped ones.
    """
    keep = np.ones(len(structures), dtype=bool)
    if max_energy_above_min_per_atom is not None:
        above = energy_above_min_per_atom(structures)
        keep &= ~(above > max_energy_above_min_per_atom)  # NaN (no energy) is kept
    if max_abs_force is not None:
        fmax = np.array([np.abs(s.forces).max() if s.forces is not None else 0.0 for s in structures])
        keep &= fmax <= max_abs_force
    return take(structures, np.flatnonzero(keep)), np.flatnonzero(~keep)


def _is_fraction(spec) -> bool:
    return isinstance(spec, float) and spec <= 1.0


def _sizes(specs: dict, n: int) -> dict[str, int | None]:
    """Frame counts of the split sizes: counts as given, fractions of ``n``
    rounded each to the nearest count, then corrected when their exact sizes
    fit but the rounded ones do not (or, with no part taking the rest, do not
    add up to the rounded total): the parts rounded the most the wrong way
    change by one frame each, the test part last. So fractions adding up to at
    most 1 always fit, and 0.8/0.1/0.1 of any number of frames uses them all."""
    exact = {k: spec * n for k, spec in specs.items() if _is_fraction(spec)}
    sizes = {k: None if spec is None else int(round(exact[k])) if k in exact else int(spec)
             for k, spec in specs.items()}
    counts = sum(v for k, v in sizes.items() if v is not None and k not in exact)
    if counts + sum(exact.values()) > n + 1e-9:
        return sizes  # does not fit: the caller says so
    rounded = sum(sizes[k] for k in exact)
    target = rounded if None in sizes.values() else int(round(sum(exact.values())))
    diff = rounded - min(target, n - counts)
    sign = 1 if diff > 0 else -1
    worst = sorted(exact, key=lambda k: (-sign * (sizes[k] - exact[k]), k == "test"))
    for k in worst[: abs(diff)]:
        sizes[k] -= sign
    return sizes


def _describe(specs: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in specs.items())


def split_indices(
    n: int,
    train: float | int | None = None,
    val: float | int | None = 0.1,
    test: float | int | None = 0.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random disjoint train/validation/test indices of ``n`` frames.

    Each size is a fraction (float <= 1) or a count (int); ``None`` takes what
    is left. Fractions are rounded to counts that fit whenever the exact sizes
    fit (0.8/0.1/0.1 of 35 frames: 28/3/4). The test part is drawn first, so
    it does not depend on the train/val sizes: changing the training size
    never moves a test frame.

    Raises
    ------
    DataError
        A size is negative, or the sizes add up to more than ``n``.
    """
    specs = dict(zip(SPLITS, (train, val, test)))
    negative = {k: v for k, v in specs.items() if v is not None and v < 0}
    if negative:
        raise DataError(f"split sizes must not be negative: {_describe(negative)}")
    sizes = _sizes(specs, n)
    fixed = sum(v for v in sizes.values() if v is not None)
    if fixed > n:
        asked = _describe({k: v for k, v in sizes.items() if v is not None})
        raise DataError(f"split sizes ({_describe(specs)}) ask for {asked}: {fixed} frames, more than the "
                        f"{n} frames available")
    rest = [k for k, v in sizes.items() if v is None]
    for k in rest:
        sizes[k] = (n - fixed) // len(rest)
    order = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for k in ("test", "val", "train"):
        out[k] = np.sort(order[start : start + sizes[k]])
        start += sizes[k]
    return out


def read_split_file(path: str | Path, n: int) -> dict[str, np.ndarray]:
    """Explicit split indices from a YAML or JSON file with keys train/val/test.

    Raises
    ------
    DataError
        The file is missing, has unknown keys, indices out of range, or overlaps.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path}: not found")
    raw = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text()) or {}
    unknown = set(raw) - set(SPLITS)
    if unknown:
        raise DataError(f"split file {path}: unknown keys {sorted(unknown)}; use {SPLITS}")
    out = {k: np.asarray(raw.get(k, []), dtype=np.int64) for k in SPLITS}
    every = np.concatenate(list(out.values()))
    if every.size and (every.min() < 0 or every.max() >= n):
        raise DataError(f"split file {path}: index out of range for {n} frames")
    if len(np.unique(every)) != every.size:
        raise DataError(f"split file {path}: train/val/test indices overlap")
    return out
