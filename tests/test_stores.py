"""On-disk stores (``mfmlip prepare``): a store-backed entry trains exactly like
its extxyz, bad stores are refused by name, and nothing is written into them."""

from __future__ import annotations

import hashlib
import os
import weakref

import h5py
import numpy as np
import pytest
import torch
import yaml
from tiny_runs import labelled_water, tiny_config

from mfmlip.data.store import CHUNK, Store, StoreError, StoreFrames, write_store
from mfmlip.data.structures import DataError, read_structures, structure_from_atoms
from mfmlip.training.config import ConfigError, load_config, resolve_data_root
from mfmlip.training.data import average_neighbors, prepare_data, training_statistics
from mfmlip.training.run import read_metrics, train
from mfmlip.training.stores import prepare

FIELDS = ("positions", "atomic_numbers", "cell", "pbc", "forces", "stress")


def _real_config(tmp_path, data_dir, **training):
    """xTB energies+forces and CCSD(T) energies of malonaldehyde, a filter, three splits."""
    cfg = {
        "seed": 3, "output_dir": str(tmp_path / "run"),
        "data": {"root": str(data_dir), "files": [
            {"path": "malonaldehyde/GFN2-xTB.extxyz", "index": "0:120", "filter": {"max_abs_force": 6.0},
             "split": {"train": None, "val": 0.1, "test": 0.1}},
            {"path": "malonaldehyde/CCSDT_CBS.extxyz", "index": "0:60", "labels": ["energy"],
             "split": {"train": None, "val": 6, "test": 6}},
        ]},
        "model": {"cutoff": 4.0, "channels": 8, "lmax": 1, "num_layers": 1, "num_radial": 4, "radial_hidden": 8},
        "training": {"batch_size": 8, "max_epochs": 2, "patience": 100, "lr": 0.01, **training},
    }
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _same_structures(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.source, x.frame, x.fidelity) == (y.source, y.frame, y.fidelity)
        np.testing.assert_equal(x.energy, y.energy)
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=f"{x.source} {name}")


def _prepare(config):
    cfg = load_config(config)
    return prepare_data(cfg, resolve_data_root(cfg))


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


@pytest.fixture
def prepared(tmp_path, data_dir, data_root_from_the_config):
    config = _real_config(tmp_path, data_dir)
    return config, prepare(config, tmp_path / "stores", progress=False)


def test_a_store_holds_what_the_file_reads(tmp_path, si_cell):
    frames = []
    for k in range(3):
        atoms = si_cell.copy()
        atoms.rattle(0.01, seed=k)
        atoms.info.update(fidelity="PBE" if k else "SCAN", energy=-10.0 - k)
        atoms.info["stress"] = np.arange(6.0) * 0.01 * k  # Voigt, ASE sign
        if k != 1:
            atoms.arrays["forces"] = np.full((len(atoms), 3), 0.1 * k)
        frames.append(structure_from_atoms(atoms, source=f"f.extxyz: frame {k}", frame=k))
    path = write_store(tmp_path / "s.h5", frames, {"file": "f.extxyz"})
    stored = StoreFrames(Store(path))
    _same_structures(frames, list(stored))
    _same_structures(frames[1:2], [stored[1]])
    assert stored.fidelity_names() == ["SCAN", "PBE", "PBE"]
    assert stored.without(["forces"])[0].forces is None


def test_writing_a_store_holds_at_most_a_chunk_of_structures(tmp_path):
    alive, peak = [0], 0
    water = [labelled_water(k) for k in range(7)]

    def gone():
        alive[0] -= 1

    def frames():
        nonlocal peak
        for k in range(CHUNK * 2 + 10):
            s = structure_from_atoms(water[k % 7], source=f"w: frame {k}", frame=k)
            alive[0] += 1
            weakref.finalize(s, gone)
            peak = max(peak, alive[0])
            yield s

    path = write_store(tmp_path / "w.h5", frames(), {"file": "w"})
    assert len(Store(path)) == CHUNK * 2 + 10
    assert peak <= CHUNK + 1


def test_prepared_config_trains_exactly_like_the_files(prepared, tmp_path):
    config, stored = prepared
    cfg_files, cfg_store = load_config(config), load_config(stored)
    files, store = prepare_data(cfg_files, resolve_data_root(cfg_files)), prepare_data(cfg_store, resolve_data_root(cfg_store))
    assert isinstance(store.splits["train"][0], type(files.splits["train"][0]))
    for split in ("train", "val", "test"):
        _same_structures(files.splits[split], store.splits[split])
    assert (files.species, files.fidelities) == (store.species, store.fidelities)
    a, b = training_statistics(files, cfg_files), training_statistics(store, cfg_store)
    np.testing.assert_array_equal(a["e0"], b["e0"])
    assert a["energy_scale"] == b["energy_scale"]
    assert average_neighbors(files.dataset("train", 4.0)) == average_neighbors(store.dataset("train", 4.0))

    stored_cfg = yaml.safe_load(stored.read_text())
    stored_cfg["output_dir"] = str(tmp_path / "run_store")
    stored_cfg["training"]["num_workers"] = 2  # graphs built in worker processes
    stored.write_text(yaml.safe_dump(stored_cfg, sort_keys=False))
    model_files, model_store = torch.load(train(config), weights_only=False), torch.load(train(stored),
                                                                                        weights_only=False)
    for name, value in model_files["state_dict"].items():
        torch.testing.assert_close(model_store["state_dict"][name], value, rtol=1e-6, atol=1e-7, msg=name)
    losses = [[float(r["train_loss"]) for r in read_metrics(run) if r.get("train_loss")]
              for run in (tmp_path / "run", tmp_path / "run_store")]
    assert losses[0] and np.allclose(losses[0], losses[1], rtol=1e-6)


def test_training_writes_nothing_into_a_store(prepared, tmp_path):
    _, stored = prepared
    stores = sorted((tmp_path / "stores").glob("*.h5"))
    before = [_digest(p) for p in stores]
    train(stored)
    assert [_digest(p) for p in stores] == before


def test_a_truncated_store_is_refused_by_name(prepared, tmp_path):
    _, stored = prepared
    path = tmp_path / "stores" / "0_GFN2-xTB.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=rf"{path}.*(truncated|cannot be read).*mfmlip prepare"):
        _prepare(stored)


@pytest.mark.parametrize("change", ["version", "format", "incomplete"])
def test_a_store_of_another_version_or_unfinished_is_refused(prepared, tmp_path, change):
    _, stored = prepared
    path = tmp_path / "stores" / "1_CCSDT_CBS.h5"
    with h5py.File(path, "a") as h5:
        if change == "version":
            h5.attrs["version"] = 99
        elif change == "format":
            h5.attrs["format"] = "something else"
        else:
            del h5.attrs["complete"]
    expected = {"version": r"store format version 99, this mfmlip reads version 2", "format": "not an mfmlip store",
                "incomplete": "incomplete store"}[change]
    with pytest.raises(StoreError, match=rf"{path}: {expected}"):
        _prepare(stored)


def test_a_store_from_other_files_or_options_is_refused(prepared, tmp_path):
    _, stored = prepared
    raw = yaml.safe_load(stored.read_text())
    raw["data"]["files"][0]["index"] = "0:100"
    raw["data"]["files"][1]["store"] = "0_GFN2-xTB.h5"  # the other entry's store
    other = stored.with_name("other.yaml")
    other.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(StoreError, match=r"0_GFN2-xTB\.h5 was not written from this entry's file.*"
                                         r"index: store '0:120', config '0:100'"):
        _prepare(other)


def test_a_source_file_changed_since_its_store_is_refused(tmp_path, data_root_from_the_config):
    config = tiny_config(tmp_path, "water")
    stored = prepare(config, tmp_path / "stores", progress=False)
    source = tmp_path / "water.extxyz"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    with pytest.raises(StoreError, match=rf"{source} changed since the store was written \(mtime_ns"):
        _prepare(stored)


def test_prepare_names_a_bad_frame_and_leaves_no_store(tmp_path, data_root_from_the_config):
    config = tiny_config(tmp_path, "water")
    source = tmp_path / "water.extxyz"
    lines = source.read_text().splitlines()
    lines[2 + 3 + 2] = lines[2 + 3 + 2].replace(lines[2 + 3 + 2].split()[1], "nan", 1)  # frame 1, atom 0, x
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"water\.extxyz: frame 1, field 'positions': contains NaN"):
        prepare(config, tmp_path / "stores", progress=False)
    assert not list((tmp_path / "stores").glob("*.h5*"))


def test_prepare_refuses_an_entry_that_is_already_a_store(prepared, tmp_path):
    _, stored = prepared
    with pytest.raises(ConfigError, match=r"data.files\[0\].*already a store"):
        prepare(stored, tmp_path / "again", progress=False)


def test_an_entry_whose_path_is_a_store_reads_it(prepared, tmp_path):
    config, _ = prepared
    raw = yaml.safe_load(config.read_text())
    entry = raw["data"]["files"][1]
    entry["path"] = str(tmp_path / "stores" / "1_CCSDT_CBS.h5")
    del entry["index"]
    direct = tmp_path / "direct.yaml"
    direct.write_text(yaml.safe_dump(raw, sort_keys=False))
    files = read_structures(load_config(config).data.root + "/malonaldehyde/CCSDT_CBS.extxyz", "0:60")
    data = _prepare(direct)
    assert sum(s.fidelity == files[0].fidelity for s in data.splits["train"]) == 60 - 12
