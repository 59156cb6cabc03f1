"""From a config to train/val/test graphs, E0s and normalisation statistics."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mfmlip import keys as K
from mfmlip.data.e0 import build_e0_table, composition_matrix
from mfmlip.data.graph import collate, structure_to_graph
from mfmlip.data.selection import SPLITS, filter_structures, read_split_file, split_indices
from mfmlip.data.structures import DataError, Structure, read_structures
from mfmlip.model.inference import Predictor
from mfmlip.model.interface import fidelity_index
from mfmlip.training.checks import check_energies_for_e0, check_label_keys
from mfmlip.training.config import Config, FileConfig, data_file


@dataclass
class PreparedData:
    """Structures per split, with the model's species and fidelity names."""

    species: list[int]
    fidelities: list[str]
    splits: dict[str, list[Structure]]
    report: list[str] = field(default_factory=list)

    def graphs(self, split: str, cutoff: float) -> list[dict]:
        return [
            structure_to_graph(s, cutoff, fidelity_index(self.fidelities, s.fidelity)) for s in self.splits[split]
        ]


def _strip_labels(structures: list[Structure], labels: list[str]) -> list[Structure]:
    """Copies without the labels a file entry does not train on."""
    drop = {}
    if "energy" not in labels:
        drop["energy"] = float("nan")
    for name in ("forces", "stress"):
        if name not in labels:
            drop[name] = None
    return [replace(s, **drop) for s in structures] if drop else structures


def _split_file(fc: FileConfig, kept: list[Structure], base: Path, seed: int) -> dict[str, list]:
    if fc.split.file:
        path = Path(fc.split.file) if Path(fc.split.file).is_absolute() else base / fc.split.file
        n_frames = max(s.frame for s in kept) + 1
        wanted = read_split_file(path, max(n_frames, 1))
        by_frame = {s.frame: s for s in kept}
        return {k: [by_frame[i] for i in wanted[k] if i in by_frame] for k in SPLITS}
    sp = fc.split
    idx = split_indices(len(kept), sp.train, sp.val, sp.test, sp.seed if sp.seed is not None else seed)
    return {k: [kept[i] for i in idx[k]] for k in SPLITS}


def read_entry(fc: FileConfig, data_cfg, root: Path, reader=read_structures):
    """Read one ``data.files`` entry and apply its filter (to all its labels;
    ``labels`` selects what is trained on, see :func:`prepare_data`).

    Returns
    -------
    structures : every frame read; kept : frames that passed the filter;
    dropped : (n_dropped,) positions in ``structures`` of the others.
    """
    structures = reader(
        data_file(root, fc.path), fc.index, fidelity=fc.fidelity, fidelity_key=data_cfg.fidelity_key,
        energy_key=fc.energy_key, forces_key=fc.forces_key, stress_key=fc.stress_key,
        stress_format=fc.stress_format, allow_missing_labels=data_cfg.allow_missing_labels,
    )
    kept, dropped = filter_structures(structures, **fc.filter.model_dump())
    return structures, kept, dropped


def prepare_data(cfg: Config, root: Path, reader=read_structures) -> PreparedData:
    """Read, filter and split every file of the config.

    The test split of each file is set aside before anything is fitted: E0s
    and statistics use the training split only. ``reader`` has the signature
    of :func:`read_structures` (a study passes a cached one).

    Raises
    ------
    ConfigError, DataError
        Missing files, unreadable frames, or no training/validation data.
    """
    splits = {k: [] for k in SPLITS}
    report = []
    base = cfg.path.parent if cfg.path else Path.cwd()
    sources = {}  # fidelity -> the entries it comes from
    for i, fc in enumerate(cfg.data.files):
        where = f"data.files[{i}]"
        structures, kept, dropped = read_entry(fc, cfg.data, root, reader)
        counts = check_label_keys(fc, data_file(root, fc.path), where, structures)
        try:
            parts = _split_file(fc, kept, base, cfg.seed)
        except DataError as err:
            raise DataError(f"{where} ({fc.path}): {err}") from None
        for k in ("train", "val"):  # the test split is scored on every label the file has
            parts[k] = _strip_labels(parts[k], fc.labels)
        for k in SPLITS:
            splits[k].extend(parts[k])
        fids = sorted({s.fidelity for s in kept})
        for f in fids:
            sources.setdefault(f, []).append(f"{where} {fc.path}, energy_key {fc.energy_key!r}")
        report.append(
            f"{fc.path} [{', '.join(fids)}]: {len(structures)} frames (labels: "
            + ", ".join(f"{k} {n}" + ("" if k in fc.labels else " unused") for k, n in counts.items())
            + f"), {len(dropped)} dropped by filter, " + ", ".join(f"{k} {len(parts[k])}" for k in SPLITS)
        )
    if not splits["train"]:
        raise DataError("empty dataset: no training structures after filtering and splitting")
    if not splits["val"]:
        raise DataError("no validation structures: give split.val > 0 for at least one file")
    check_energies_for_e0(cfg, splits["train"], sources)
    fidelities = list(dict.fromkeys(s.fidelity for k in SPLITS for s in splits[k]))
    species = sorted({int(z) for k in ("train", "val") for s in splits[k] for z in s.atomic_numbers})
    for s in splits["test"]:
        unseen = sorted(set(s.atomic_numbers.tolist()) - set(species))
        if unseen:
            raise DataError(f"{s.source}: test structure with elements {unseen} (atomic numbers) "
                            "that no training or validation structure has")
    return PreparedData(species, fidelities, splits, report)


def subtract_base(structures: list[Structure], base, fidelity: str, batch_size: int = 64) -> list[Structure]:
    """Copies of ``structures`` whose energy, forces and stress labels are minus
    ``base``'s predictions at ``fidelity``: the targets of delta-learning
    (:class:`mfmlip.model.delta.DeltaPotential`). Missing labels stay missing.

    Raises
    ------
    ValueError
        ``fidelity`` or an element unknown to ``base``.
    """
    stress = any(s.stress is not None for s in structures)
    out = []
    for chunk, batch, pred in Predictor(base, fidelity).predict(structures, batch_size, stress=stress):
        forces = torch.split(pred[K.FORCES].double().cpu(), batch[K.N_ATOMS].tolist())
        for i, (s, f) in enumerate(zip(chunk, forces, strict=True)):
            out.append(replace(
                s, energy=s.energy - float(pred[K.ENERGY][i]),
                forces=None if s.forces is None else s.forces - f.numpy(),
                stress=None if s.stress is None else s.stress - pred[K.STRESS][i].double().cpu().numpy(),
            ))
    return out


def average_neighbors(graphs: list[dict]) -> float:
    """Mean number of neighbours per atom in the graphs (at least 1)."""
    n_edges = sum(g[K.EDGE_INDEX].shape[1] for g in graphs)
    n_atoms = sum(g[K.POSITIONS].shape[0] for g in graphs)
    return max(n_edges / max(n_atoms, 1), 1.0)


def training_statistics(data: PreparedData, cfg: Config) -> dict:
    """E0 table and energy scale from the training split.

    ``energy_scale`` is the RMS of the training force components (eV/Angstrom),
    or, without forces, the std of per-atom energies after E0 (eV/atom).
    """
    train = data.splits["train"]
    e0 = build_e0_table(train, data.species, data.fidelities, cfg.data.e0, cfg.data.e0_ridge)
    forces = [s.forces for s in train if s.forces is not None]
    if forces:
        scale = float(np.sqrt(np.mean(np.concatenate(forces) ** 2)))
    else:
        fid = np.array([data.fidelities.index(s.fidelity) for s in train])
        e_ref = np.einsum("sk,sk->s", composition_matrix(train, data.species), e0[fid])
        per_atom = (np.array([s.energy for s in train]) - e_ref) / np.array([s.n_atoms for s in train])
        scale = float(np.nanstd(per_atom))
    return {"e0": e0, "energy_scale": scale if np.isfinite(scale) and scale > 1e-6 else 1.0}


class GraphDataset(torch.utils.data.Dataset):
    """A list of prebuilt graphs (neighbour lists computed once)."""

    def __init__(self, graphs: list[dict]):
        self.graphs = graphs

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, i: int) -> dict:
        return {**self.graphs[i], K.STRUCTURE_INDEX: torch.tensor([i])}


class EpochShuffle(torch.utils.data.Sampler):
    """Random order that depends only on ``(seed, epoch)``; ``passes`` random
    passes over the data make one epoch.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed
    from a checkpoint sees the same batches as an uninterrupted one. Several
    passes per epoch keep the per-epoch overhead small when a step-budgeted
    run has only a few batches of data.
    """

    def __init__(self, n: int, seed: int = 0, passes: int = 1):
        self.n, self.seed, self.epoch, self.passes = n, seed, 0, passes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.cat([torch.randperm(self.n, generator=g) for _ in range(self.passes)]).tolist())

    def __len__(self) -> int:
        return self.n * self.passes


def epoch_passes(n: int, batch_size: int, min_batches: int = 1) -> int:
    """Passes over ``n`` items that make an epoch of at least ``min_batches`` batches."""
    return max(1, -(-min_batches * batch_size // max(n, 1)))


def make_loader(graphs: list[dict], batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
                min_batches: int = 1, sampler: torch.utils.data.Sampler | None = None):
    """DataLoader over prebuilt graphs that yields collated batches; a shuffled
    one repeats the data within an epoch until it has ``min_batches`` batches.
    ``sampler`` (e.g. :class:`mfmlip.training.sampler.FidelityShareSampler`)
    replaces the shuffle."""
    if sampler is None and shuffle:
        sampler = EpochShuffle(len(graphs), seed, epoch_passes(len(graphs), batch_size, min_batches))
    return torch.utils.data.DataLoader(
        GraphDataset(graphs), batch_size=batch_size, collate_fn=collate,
        sampler=sampler,
        num_workers=num_workers, persistent_workers=num_workers > 0,
    )
