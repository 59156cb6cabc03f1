"""From a config to train/val/test graphs, E0s and normalisation statistics."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch

from mfmlip import keys as K
from mfmlip.data.e0 import build_e0_table
from mfmlip.data.graph import collate, neighbor_list, structure_to_graph
from mfmlip.data.selection import SPLITS, filter_structures, read_split_file, split_indices
from mfmlip.data.store import StoreFrames, chain, fidelity_names, in_memory, take
from mfmlip.data.structures import DataError, Structure, read_structures
from mfmlip.model.inference import Predictor
from mfmlip.model.interface import fidelity_index
from mfmlip.training.checks import check_energies_for_e0, check_label_keys
from mfmlip.training.config import Config, FileConfig, data_file
from mfmlip.training.sampler import RankShard
from mfmlip.training.stores import open_store


@dataclass
class PreparedData:
    """Structures per split (lists, or for entries read from stores, sequences
    that read frames from disk on access), with the model's species and
    fidelity names."""

    species: list[int]
    fidelities: list[str]
    splits: dict[str, Sequence[Structure]]
    report: list[str] = field(default_factory=list)

    def dataset(self, split: str, cutoff: float) -> GraphDataset:
        """The graphs of a split: built once when its structures are in memory,
        else on access (in DataLoader workers when ``num_workers > 0``)."""
        frames = self.splits[split]
        return GraphDataset(frames, cutoff, self.fidelities, cache=in_memory(frames))


def _strip_labels(structures: Sequence[Structure], labels: list[str]) -> Sequence[Structure]:
    """The structures without the labels a file entry does not train on."""
    drop = [name for name in ("energy", "forces", "stress") if name not in labels]
    if not drop:
        return structures
    if isinstance(structures, StoreFrames):
        return structures.without(drop)
    return [replace(s, **{n: float("nan") if n == "energy" else None for n in drop}) for s in structures]


def _frame_numbers(structures: Sequence[Structure]) -> np.ndarray:
    if isinstance(structures, StoreFrames):
        return structures.frames
    return np.array([s.frame for s in structures], dtype=np.int64)


def _split_file(fc: FileConfig, kept: Sequence[Structure], base: Path, seed: int) -> dict[str, Sequence]:
    if fc.split.file:
        path = Path(fc.split.file) if Path(fc.split.file).is_absolute() else base / fc.split.file
        frames = _frame_numbers(kept)
        wanted = read_split_file(path, max(int(frames.max(initial=-1)) + 1, 1))
        position = {int(f): k for k, f in enumerate(frames)}
        return {k: take(kept, [position[int(i)] for i in wanted[k] if int(i) in position]) for k in SPLITS}
    sp = fc.split
    idx = split_indices(len(kept), sp.train, sp.val, sp.test, sp.seed if sp.seed is not None else seed)
    return {k: take(kept, idx[k]) for k in SPLITS}


def read_entry(fc: FileConfig, data_cfg, root: Path, reader=read_structures, base: Path | None = None):
    """Read one ``data.files`` entry and apply its filter (to all its labels;
    ``labels`` selects what is trained on, see :func:`prepare_data`). An entry
    with a store (``store:``, relative to ``base``, the config's folder) is read
    from it, and its frames stay on disk.

    Returns
    -------
    structures : every frame read; kept : frames that passed the filter;
    dropped : (n_dropped,) positions in ``structures`` of the others.
    """
    stored = open_store(fc, data_cfg, root, base or Path.cwd())
    structures = stored if stored is not None else reader(
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
        structures, kept, dropped = read_entry(fc, cfg.data, root, reader, base)
        counts = check_label_keys(fc, _entry_file(fc, root, structures), where, structures)
        try:
            parts = _split_file(fc, kept, base, cfg.seed)
        except DataError as err:
            raise DataError(f"{where} ({fc.path}): {err}") from None
        for k in ("train", "val"):  # the test split is scored on every label the file has
            parts[k] = _strip_labels(parts[k], fc.labels)
        for k in SPLITS:
            splits[k].append(parts[k])
        fids = sorted(set(fidelity_names(kept)))
        for f in fids:
            sources.setdefault(f, []).append(f"{where} {fc.path}, energy_key {fc.energy_key!r}")
        report.append(
            f"{fc.path} [{', '.join(fids)}]: {len(structures)} frames (labels: "
            + ", ".join(f"{k} {n}" + ("" if k in fc.labels else " unused") for k, n in counts.items())
            + f"), {len(dropped)} dropped by filter, " + ", ".join(f"{k} {len(parts[k])}" for k in SPLITS)
        )
    splits = {k: chain(parts) for k, parts in splits.items()}
    if not splits["train"]:
        raise DataError("empty dataset: no training structures after filtering and splitting")
    if not splits["val"]:
        raise DataError("no validation structures: give split.val > 0 for at least one file")
    check_energies_for_e0(cfg, splits["train"], sources)
    fidelities = list(dict.fromkeys(f for k in SPLITS for f in fidelity_names(splits[k])))
    species = sorted({int(z) for k in ("train", "val") for s in splits[k] for z in s.atomic_numbers})
    for s in splits["test"]:
        unseen = sorted(set(s.atomic_numbers.tolist()) - set(species))
        if unseen:
            raise DataError(f"{s.source}: test structure with elements {unseen} (atomic numbers) "
                            "that no training or validation structure has")
    return PreparedData(species, fidelities, splits, report)


def _entry_file(fc: FileConfig, root: Path, structures: Sequence[Structure]) -> Path:
    """The file an entry's frames come from (a store's source, as it recorded it)."""
    if isinstance(structures, StoreFrames):
        return Path(structures.store.source["file"])
    return data_file(root, fc.path)


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


def average_neighbors(dataset: GraphDataset) -> float:
    """Mean number of neighbours per atom in a dataset's graphs (at least 1); one pass."""
    n_edges = n_atoms = 0
    for edges, atoms in dataset.neighbor_counts():
        n_edges += edges
        n_atoms += atoms
    return max(n_edges / max(n_atoms, 1), 1.0)


def training_statistics(data: PreparedData, cfg: Config) -> dict:
    """E0 table and energy scale from the training split, in streaming passes.

    ``energy_scale`` is the RMS of the training force components (eV/Angstrom),
    or, without forces, the std of per-atom energies after E0 (eV/atom).
    """
    train = data.splits["train"]
    e0 = build_e0_table(train, data.species, data.fidelities, cfg.data.e0, cfg.data.e0_ridge)
    squares = count = 0.0
    per_atom = []
    column = {z: k for k, z in enumerate(data.species)}
    for s in train:
        if s.forces is not None:
            squares += float(np.sum(s.forces ** 2))
            count += s.forces.size
        elif not count:  # only needed when no structure has forces
            e_ref = e0[data.fidelities.index(s.fidelity)][[column[int(z)] for z in s.atomic_numbers]].sum()
            per_atom.append((s.energy - e_ref) / s.n_atoms)
    scale = float(np.sqrt(squares / count)) if count else float(np.nanstd(per_atom))
    return {"e0": e0, "energy_scale": scale if np.isfinite(scale) and scale > 1e-6 else 1.0}


class GraphDataset(torch.utils.data.Dataset):
    """The graphs of a sequence of structures (neighbour lists by vesin).

    With ``cache`` every graph is built once, here; without, each is built when
    asked for, so a store's frames are read and their neighbour lists computed
    in the DataLoader's worker processes, never all held in memory.

    Parameters
    ----------
    structures : a list, or a store's frames (:class:`mfmlip.data.store.StoreFrames`).
    cutoff : Angstrom. fidelities : the model's fidelity names (graphs hold indices).
    """

    def __init__(self, structures: Sequence[Structure], cutoff: float, fidelities: list[str], cache: bool = True):
        self.structures, self.cutoff, self.fidelities = structures, cutoff, fidelities
        self.cache = [self._graph(s) for s in structures] if cache else None

    def _graph(self, s: Structure) -> dict:
        return structure_to_graph(s, self.cutoff, fidelity_index(self.fidelities, s.fidelity))

    def neighbor_counts(self) -> Iterator[tuple[int, int]]:
        """``(edges, atoms)`` of each graph, in order: from the cached graphs, else
        from the neighbour list alone (a sequential pass over a store)."""
        if self.cache is not None:
            return ((g[K.EDGE_INDEX].shape[1], g[K.POSITIONS].shape[0]) for g in self.cache)
        return ((neighbor_list(s.positions, s.cell, s.pbc, self.cutoff)[0].shape[1], s.n_atoms)
                for s in self.structures)

    def fidelity_indices(self) -> list[int]:
        """(n,) fidelity index of each graph, without building graphs."""
        return [fidelity_index(self.fidelities, f) for f in fidelity_names(self.structures)]

    def __len__(self) -> int:
        return len(self.structures)

    def __getitem__(self, i: int) -> dict:
        graph = self.cache[i] if self.cache is not None else self._graph(self.structures[i])
        return {**graph, K.STRUCTURE_INDEX: torch.tensor([i])}


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


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool, num_workers: int = 0,
                seed: int = 0, min_batches: int = 1, sampler: torch.utils.data.Sampler | None = None):
    """DataLoader that yields collated batches of a :class:`GraphDataset`; a
    shuffled one repeats the data within an epoch until it has ``min_batches``
    batches. ``sampler`` (e.g. :class:`mfmlip.training.sampler.FidelityShareSampler`,
    or a :class:`~mfmlip.training.sampler.RankShard` of one) replaces the shuffle.
    With ``num_workers > 0`` graphs not built yet are built in that many worker processes."""
    if sampler is None and shuffle:
        sampler = EpochShuffle(len(dataset), seed, epoch_passes(len(dataset), batch_size, min_batches))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, collate_fn=collate, sampler=sampler,
        num_workers=num_workers, persistent_workers=num_workers > 0,
    )


class GraphDataModule(L.LightningDataModule):
    """Training and validation loaders for one or several processes.

    The loaders are made once the trainer knows this process's rank and the
    number of processes; each process then draws its
    :class:`~mfmlip.training.sampler.RankShard` of the same global order
    (``train_order``: the epoch's draws, set by ``(seed, epoch)``).

    Parameters
    ----------
    train_set, val_set : :class:`GraphDataset`. train_order : sampler of the training draws.
    batch_size, eval_batch_size : per process. num_workers : DataLoader workers per process.
    """

    def __init__(self, train_set, val_set, train_order, batch_size: int, eval_batch_size: int, num_workers: int):
        super().__init__()
        self.train_set, self.val_set, self.train_order = train_set, val_set, train_order
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers

    def _shard(self, order, batch_size: int, pad: bool) -> RankShard:
        return RankShard(order, batch_size, self.trainer.global_rank, self.trainer.world_size, pad)

    def train_dataloader(self):
        sampler = self._shard(self.train_order, self.batch_size, pad=True)
        return make_loader(self.train_set, self.batch_size, True, self.num_workers, sampler=sampler)

    def val_dataloader(self):
        sampler = self._shard(range(len(self.val_set)), self.eval_batch_size, pad=False)
        return make_loader(self.val_set, self.eval_batch_size, False, self.num_workers, sampler=sampler)
