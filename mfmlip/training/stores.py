"""``mfmlip prepare``: a config's data files as stores (:mod:`mfmlip.data.store`),
and the check that a store an entry names was written from that entry's file.

A prepared config is the original with ``store:`` added to each entry (paths
relative to the prepared config); training from it gives the same splits,
filters, E0s, statistics and losses as from the files themselves.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml
from tqdm import tqdm

from mfmlip.atomic_io import atomic_write
from mfmlip.data.store import Store, StoreError, StoreFrames, is_store, source_identity, write_store
from mfmlip.data.structures import frame_keys, iter_structures
from mfmlip.training.config import READING_OPTIONS, Config, ConfigError, FileConfig, data_file, load_config

DATA_OPTIONS = ("fidelity_key", "allow_missing_labels")  # data: keys that also change what is read


def reading_record(fc: FileConfig, data_cfg, path: Path) -> dict:
    """What a store records of its source: the entry's reading options, the
    file (as the config names it and as resolved), its size and time."""
    return {
        **{name: getattr(fc, name) for name in READING_OPTIONS},
        **{name: getattr(data_cfg, name) for name in DATA_OPTIONS},
        "file": str(path), **source_identity(path), "keys": frame_keys(path, fc.index),
    }


def _mismatch(record: dict, fc: FileConfig, data_cfg, names) -> list[str]:
    want = {**{n: getattr(fc, n) for n in READING_OPTIONS}, **{n: getattr(data_cfg, n) for n in DATA_OPTIONS}}
    return [f"{n}: store {record.get(n)!r}, config {want[n]!r}" for n in names if record.get(n) != want[n]]


def open_store(fc: FileConfig, data_cfg, root: Path, base: Path) -> StoreFrames | None:
    """The frames of an entry's store, or None when the entry reads a file.

    ``store:`` (relative to ``base``, the config's folder) must have been written
    from ``path`` with the entry's reading options; when the source file is at
    hand, it must not have changed since (size, modification time). An entry
    whose ``path`` is itself a store reads it as written; reading options the
    entry sets must match the store's.

    Raises
    ------
    StoreError
        The store is unusable (see :class:`~mfmlip.data.store.Store`) or was
        written from another file, other options, or an older version of the file.
    """
    if fc.store is None and not is_store(fc.path):
        return None
    if fc.store is None:
        store = Store(data_file(root, fc.path))
    else:
        store = Store(Path(fc.store) if Path(fc.store).is_absolute() else base / fc.store)
    record = store.source
    names = READING_OPTIONS if fc.store else [n for n in READING_OPTIONS if n in fc.model_fields_set and n != "path"]
    problems = _mismatch(record, fc, data_cfg, names)
    source = Path(fc.path) if Path(fc.path).is_absolute() else root / fc.path
    if fc.store and not problems and source.is_file():
        now = source_identity(source)
        problems += [f"{source} changed since the store was written ({k} {record.get(k)} -> {v})"
                     for k, v in now.items() if record.get(k) != v]
    if problems:
        raise StoreError(f"store {store.path} was not written from this entry's file as the config reads it: "
                         + "; ".join(problems) + "; write it again with mfmlip prepare")
    return StoreFrames(store)


def store_name(k: int, fc: FileConfig) -> str:
    """``<k>_<file stem>.h5``: the store of entry ``k``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(fc.path).name.split(".")[0])
    return f"{k}_{stem}.h5"


def prepare(config: str | Path, out_dir: str | Path, data_root: str | Path | None = None,
            progress: bool = True) -> Path:
    """Write every data file of a config into a store in ``out_dir``, streaming
    (memory bounded whatever the file's size), and ``out_dir/<config name>``:
    the config with ``store:`` set on each entry. Returns that config's path.

    Labels are stored converted (eV, eV/Angstrom, eV/Angstrom^3, ASE sign) with
    each frame's fidelity and source (file, frame number).

    Raises
    ------
    ConfigError, DataError
        Invalid config, missing or unreadable file, a bad frame (named).
    """
    from mfmlip.training.config import resolve_data_root

    cfg = config if isinstance(config, Config) else load_config(config)
    root, out = resolve_data_root(cfg, data_root), Path(out_dir)
    raw = yaml.safe_load(Path(cfg.path).read_text()) if cfg.path else cfg.model_dump(mode="json")
    if cfg.path and out.resolve() == Path(cfg.path).parent:
        raise ConfigError(f"mfmlip prepare: {out} holds the config itself; write the stores to another folder")
    for k, fc in enumerate(cfg.data.files):
        if fc.store or is_store(fc.path):
            raise ConfigError(f"data.files[{k}] ({fc.path}): already a store")
        path = data_file(root, fc.path)
        target = out / store_name(k, fc)
        bar = tqdm(desc=f"{fc.path} -> {target}", unit=" frames", file=sys.stderr,
                   disable=None if progress else True)  # None: on a terminal only
        frames = iter_structures(path, fc.index, fidelity=fc.fidelity, fidelity_key=cfg.data.fidelity_key,
                                 energy_key=fc.energy_key, forces_key=fc.forces_key, stress_key=fc.stress_key,
                                 stress_format=fc.stress_format,
                                 allow_missing_labels=cfg.data.allow_missing_labels)
        with bar:
            write_store(target, frames, reading_record(fc, cfg.data, path), progress=lambda n: bar.update(1))
        print(f"{fc.path}: {len(Store(target))} frames -> {target}", flush=True)
        entry = raw["data"]["files"][k]
        entry["store"] = target.name
        if fc.split.file:  # relative to the original config's folder
            entry["split"]["file"] = str(_split_path(cfg, fc.split.file).resolve())
    raw["data"]["root"] = str(root.resolve())  # the prepared config lives elsewhere
    prepared = out / (Path(cfg.path).name if cfg.path else "config.yaml")
    atomic_write(prepared, lambda fh: yaml.safe_dump(raw, fh, sort_keys=False), mode="w")
    return prepared



def _split_path(cfg: Config, name: str) -> Path:
    base = Path(cfg.path).parent if cfg.path else Path.cwd()
    return Path(name) if Path(name).is_absolute() else base / name
