"""On-disk datasets: labelled structures in one HDF5 file (``mfmlip prepare``).

A store holds what :func:`mfmlip.data.structures.read_structures` returns for
one ``data.files`` entry (labels already in eV, eV/Angstrom, eV/Angstrom^3, ASE
sign), frame by frame, so that training reads frames when it needs them instead
of holding every structure in memory. HDF5 (via h5py) because it is what MACE
uses for the same job, is one self-describing file with chunked, resizable
arrays (written in a stream, read at random), and a truncated file fails to
open with an error rather than a crash (LMDB's memory map can fault instead).

Layout: two tables of records, so that a range of frames is two reads::

    atoms (n_atoms,): positions (3,) f8 | atomic_numbers i2 | forces (3,) f8     (concatenated over frames)
    frames (n,): n_atoms i4 | cell (3, 3) f8 | pbc (3,) bool | energy f8 (NaN: missing) | has_forces bool
                 | stress (3, 3) f8 | has_stress bool | fidelity i4 (into attrs["fidelities"]) | frame i8

Attributes: ``format`` (:data:`FORMAT`), ``version`` (:data:`VERSION`),
``fidelities`` and ``source`` (JSON: the file as the config names it, its size
and modification time, the reading options, the label keys of its first frame),
``complete`` (set last: a store whose writing was interrupted has none).
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from mfmlip.data.structures import DataError, Structure

FORMAT = "mfmlip-store"
VERSION = 2
SUFFIXES = (".h5", ".hdf5")
CHUNK = 4096  # frames per write and per read in a sequential pass
READ_CHUNK = 512  # records per HDF5 chunk: a random read of one frame reads its chunk
CACHE_BYTES = 64 * 2**20  # HDF5 chunk cache per dataset and process

ATOM = np.dtype([("positions", "f8", (3,)), ("atomic_numbers", "i2"), ("forces", "f8", (3,))])
FRAME = np.dtype([("n_atoms", "i4"), ("cell", "f8", (3, 3)), ("pbc", "?", (3,)), ("energy", "f8"),
                  ("has_forces", "?"), ("stress", "f8", (3, 3)), ("has_stress", "?"), ("fidelity", "i4"),
                  ("frame", "i8")])
TABLES = {"atoms": ATOM, "frames": FRAME}


class StoreError(DataError):
    """A store that cannot be used: missing, truncated, of another format or
    version, or written from other files than the config names."""


def is_store(path: str | Path) -> bool:
    """Whether ``path`` names a store (by its suffix, :data:`SUFFIXES`)."""
    return Path(path).suffix.lower() in SUFFIXES


def source_identity(path: Path) -> dict:
    """Size (bytes) and modification time (ns) of a source file, to tell later
    whether a store was written from the file as it is now."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class StoreWriter:
    """Write structures into a new store, a chunk at a time (memory bounded by
    :data:`CHUNK` frames). The file appears at ``path`` only when :meth:`close`
    succeeds (written to a temporary name, then renamed); use as a context
    manager, which removes the temporary file on an error.

    Parameters
    ----------
    path : the store to write (suffix ``.h5`` or ``.hdf5``).
    source : JSON-able description of where the frames come from (see module docstring).
    """

    def __init__(self, path: str | Path, source: dict):
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.h5 = h5py.File(self.tmp, "w")
        self.source, self.fidelities, self.buffer = source, [], []
        self.n_frames = 0
        for name, dtype in TABLES.items():
            self.h5.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(READ_CHUNK,))

    def add(self, structure: Structure) -> None:
        """Append one structure (written when the buffer holds :data:`CHUNK`)."""
        self.buffer.append(structure)
        if len(self.buffer) >= CHUNK:
            self._flush()

    def _code(self, fidelity: str) -> int:
        if fidelity not in self.fidelities:
            self.fidelities.append(fidelity)
        return self.fidelities.index(fidelity)

    def _flush(self) -> None:
        frames = self.buffer
        if not frames:
            return
        atoms = np.zeros(sum(s.n_atoms for s in frames), ATOM)
        atoms["positions"] = np.concatenate([s.positions for s in frames])
        atoms["atomic_numbers"] = np.concatenate([s.atomic_numbers for s in frames])
        atoms["forces"] = np.concatenate([s.forces if s.forces is not None else np.zeros((s.n_atoms, 3))
                                          for s in frames])
        rows = np.zeros(len(frames), FRAME)
        for name, values in {
            "n_atoms": [s.n_atoms for s in frames], "cell": [s.cell for s in frames],
            "pbc": [s.pbc for s in frames], "energy": [s.energy for s in frames],
            "has_forces": [s.forces is not None for s in frames],
            "stress": [s.stress if s.stress is not None else np.zeros((3, 3)) for s in frames],
            "has_stress": [s.stress is not None for s in frames],
            "fidelity": [self._code(s.fidelity) for s in frames], "frame": [s.frame for s in frames],
        }.items():
            rows[name] = values
        for name, values in (("atoms", atoms), ("frames", rows)):
            ds = self.h5[name]
            start = ds.shape[0]
            ds.resize(start + len(values), axis=0)
            ds[start:] = values
        self.n_frames += len(frames)
        self.buffer = []

    def close(self) -> Path:
        """Write what is buffered and the attributes, mark the store complete and
        move it to ``path``. Returns ``path``."""
        self._flush()
        attrs = self.h5.attrs
        attrs["format"], attrs["version"] = FORMAT, VERSION
        attrs["fidelities"] = json.dumps(self.fidelities)
        attrs["source"] = json.dumps(self.source)
        attrs["n_frames"] = self.n_frames
        attrs["complete"] = True
        self.h5.close()
        os.replace(self.tmp, self.path)
        return self.path

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is not None:
            self.h5.close()
            self.tmp.unlink(missing_ok=True)


class Store:
    """A store opened read-only; structures are read when asked for.

    The HDF5 file is opened lazily in each process (h5py handles do not
    survive a fork), so a store can be shared with DataLoader workers.

    Parameters
    ----------
    path : the store.

    Raises
    ------
    StoreError
        Missing, not a store, of another version, incomplete or truncated; the
        message names the file and says to run ``mfmlip prepare`` again.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._h5, self._pid = None, None
        h5 = self._file()
        attrs = h5.attrs
        again = "write it again with mfmlip prepare"
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{self.path}: not an mfmlip store (no format attribute {FORMAT!r}); {again}")
        if int(attrs.get("version", -1)) != VERSION:
            raise StoreError(f"{self.path}: store format version {attrs.get('version')}, this mfmlip reads "
                             f"version {VERSION}; {again}")
        if not attrs.get("complete", False):
            raise StoreError(f"{self.path}: incomplete store (its writing was interrupted); {again}")
        self.n_frames = int(attrs["n_frames"])
        self.fidelities = json.loads(attrs["fidelities"])
        self.source = json.loads(attrs["source"])
        lengths = {name: h5[name].shape[0] if name in h5 else 0 for name in TABLES}
        if lengths["frames"] != self.n_frames:
            raise StoreError(f"{self.path}: truncated store: {lengths['frames']} of {self.n_frames} frames; {again}")
        self.offsets = np.concatenate([[0], np.cumsum(h5["frames"].fields("n_atoms")[:], dtype=np.int64)])
        if lengths["atoms"] != self.offsets[-1]:
            raise StoreError(f"{self.path}: truncated store: {lengths['atoms']} of {self.offsets[-1]} atoms; {again}")
        self.codes = h5["frames"].fields("fidelity")[:]

    def _file(self):
        import h5py

        if self._h5 is None or self._pid != os.getpid():
            try:
                self._h5, self._pid = h5py.File(self.path, "r", rdcc_nbytes=CACHE_BYTES), os.getpid()
            except FileNotFoundError:
                raise StoreError(f"{self.path}: store not found") from None
            except OSError as err:
                raise StoreError(f"{self.path}: cannot be read as an HDF5 store (truncated or damaged? {err}); "
                                 "write it again with mfmlip prepare") from None
        return self._h5

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_h5": None, "_pid": None}

    def __len__(self) -> int:
        return self.n_frames

    def fidelity_names(self, indices: np.ndarray) -> list[str]:
        """Fidelity name of each frame in ``indices``."""
        return [self.fidelities[c] for c in self.codes[indices]]

    def read(self, lo: int, hi: int) -> list[Structure]:
        """Frames ``lo`` to ``hi - 1``, read with one access per array."""
        h5 = self._file()
        a, b = self.offsets[lo], self.offsets[hi]
        atoms, rows = h5["atoms"][a:b], h5["frames"][lo:hi]
        atoms = {name: np.ascontiguousarray(atoms[name]) for name in ATOM.names}  # columns, not records
        out = []
        for k in range(hi - lo):
            s, e = self.offsets[lo + k] - a, self.offsets[lo + k + 1] - a
            out.append(Structure(
                positions=atoms["positions"][s:e], atomic_numbers=atoms["atomic_numbers"][s:e].astype(np.int64),
                cell=rows["cell"][k], pbc=rows["pbc"][k], fidelity=self.fidelities[rows["fidelity"][k]],
                energy=float(rows["energy"][k]),
                forces=atoms["forces"][s:e] if rows["has_forces"][k] else None,
                stress=rows["stress"][k] if rows["has_stress"][k] else None,
                source=f"{self.source['file']}: frame {rows['frame'][k]}", frame=int(rows["frame"][k]),
            ))
        return out


class StoreFrames(Sequence):
    """Some frames of a store as a sequence of :class:`Structure`, read on access.

    ``drop`` names labels to leave out (``energy``, ``forces``, ``stress``), as
    a ``data.files`` entry's ``labels`` does for the training split. Iterating
    reads in chunks of :data:`CHUNK` frames; nothing is cached.
    """

    def __init__(self, store: Store, indices: Iterable[int] | None = None, drop: frozenset = frozenset()):
        self.store = store
        self.indices = np.arange(len(store)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.drop = frozenset(drop)

    def __len__(self) -> int:
        return len(self.indices)

    def _stripped(self, s: Structure) -> Structure:
        if not self.drop:
            return s
        return replace(s, **{name: float("nan") if name == "energy" else None for name in self.drop})

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.take(np.arange(len(self))[k])
        i = int(self.indices[k])
        return self._stripped(self.store.read(i, i + 1)[0])

    def __iter__(self) -> Iterator[Structure]:
        for start in range(0, len(self.indices), CHUNK):
            part = self.indices[start : start + CHUNK]
            lo, hi = int(part.min()), int(part.max()) + 1
            if hi - lo > 4 * CHUNK:  # scattered: frame by frame
                yield from (self[start + k] for k in range(len(part)))
                continue
            frames = self.store.read(lo, hi)
            yield from (self._stripped(frames[i - lo]) for i in part)

    def take(self, positions) -> StoreFrames:
        """The frames at ``positions`` of this sequence (an index array)."""
        return StoreFrames(self.store, self.indices[np.asarray(positions, dtype=np.int64)], self.drop)

    def without(self, labels: Iterable[str]) -> StoreFrames:
        """The same frames without ``labels``."""
        return StoreFrames(self.store, self.indices, self.drop | set(labels))

    @property
    def frames(self) -> np.ndarray:
        """(n,) frame number in the source file of each item."""
        return self.store._file()["frames"].fields("frame")[:][self.indices]

    def fidelity_names(self) -> list[str]:
        return self.store.fidelity_names(self.indices)


class Chain(Sequence):
    """Several sequences of structures as one (a split gathered from several entries)."""

    def __init__(self, parts: list[Sequence]):
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, k: int) -> Structure:
        k = range(len(self))[k]
        part = bisect_right(self.starts, k) - 1
        return self.parts[part][k - self.starts[part]]

    def __iter__(self) -> Iterator[Structure]:
        for part in self.parts:
            yield from part

    def fidelity_names(self) -> list[str]:
        return [name for part in self.parts for name in fidelity_names(part)]


def take(frames: Sequence, positions) -> Sequence:
    """``frames[positions]`` for a list or a :class:`StoreFrames` (which stays on disk)."""
    if isinstance(frames, StoreFrames):
        return frames.take(positions)
    return [frames[int(i)] for i in positions]


def chain(parts: list[Sequence]) -> Sequence:
    """One sequence of ``parts``: a list when all are lists, else a :class:`Chain`."""
    if all(isinstance(p, list) for p in parts):
        return [s for p in parts for s in p]
    return Chain(parts)


def fidelity_names(frames: Sequence) -> list[str]:
    """The fidelity of each structure, without reading stored frames."""
    if hasattr(frames, "fidelity_names"):
        return frames.fidelity_names()
    return [s.fidelity for s in frames]


def in_memory(frames: Sequence) -> bool:
    """Whether ``frames`` hold their structures in memory (a list)."""
    return isinstance(frames, list)


def write_store(path: str | Path, structures: Iterable[Structure], source: dict, progress=None) -> Path:
    """Write ``structures`` (any iterable: consumed once, in a stream) into a new store.

    ``progress`` is called with the number of frames written after each frame.
    Returns the path. A failure leaves no file at ``path`` (and any earlier one intact).
    """
    with StoreWriter(path, source) as writer:
        for k, s in enumerate(structures, 1):
            writer.add(s)
            if progress is not None:
                progress(k)
        return writer.close()
