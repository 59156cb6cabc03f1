"""Bad input gives a clear error naming the file, frame and field (or, for
configs, the key), or is handled where it is legitimate (isolated atoms, small
or partly periodic cells); never a crash or a NaN deep in torch.

The first sections are by failure class (names that match nothing, runs that
would overwrite runs, CLI values, splits, frame blame, unlabelled files); the
last has the basic cases (missing file, frame without fidelity, wrong-shaped
label in ``info``, NaN energy, unknown element/fidelity in the calculator,
config keys and types).
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from conftest import predict
from tiny_runs import labelled_water, tiny_config, write_water

from mfmlip import MFCalculator
from mfmlip.analysis.evaluate import evaluate
from mfmlip.cli.main import main
from mfmlip.data import DataError, atoms_to_batch, collate, read_structures, structure_from_atoms, structure_to_graph
from mfmlip.model import save_model
from mfmlip.training.config import ConfigError, load_config, resolve_data_root
from mfmlip.training.loss import MaskedLoss
from mfmlip.training.run import read_metrics, train

pytestmark = pytest.mark.usefixtures("data_root_from_the_config")


def at(path) -> str:
    """``path`` as a regular expression that matches only itself."""
    return re.escape(str(path))


def three_frames(path: Path) -> list[str]:
    """Write 3 labelled water frames (5 lines each) and return the lines."""
    write_water(path, n=3)
    return path.read_text().splitlines(keepends=True)


# --- malformed, truncated and empty files -------------------------------------------


def _cut_last_atom_lines(lines):
    return lines[:-2]


def _cut_mid_line(lines):
    return lines[:-1] + [lines[-1][:20]]


def _bad_count(lines):
    return lines[:5] + ["three\n"] + lines[6:]


def _non_numeric(lines):
    columns = lines[7].split()
    columns[2] = "1.2.3"  # the y coordinate of the first atom of frame 1
    return lines[:7] + [" ".join(columns) + "\n"] + lines[8:]


def _blank_then_more(lines):
    return lines[:10] + ["\n"] + lines[10:]


@pytest.mark.parametrize("damage, expected", [
    (_cut_last_atom_lines, (r"cannot be read: frame 2 \(line 11\) is truncated: 1 of its 3 atom lines "
                            r"before the end of the file")),
    (_cut_mid_line, r"cannot be read by ASE: frame 2 \(lines 11-15\): ValueError"),
    (_bad_count, r"cannot be read: frame 1 \(line 6\): expected the number of atoms of a frame, got 'three'"),
    (_non_numeric, r"cannot be read by ASE: frame 1 \(lines 6-10\): ValueError: .*'1\.2\.3'"),
    (_blank_then_more, (r"cannot be read: frame 2 \(line 11\): blank line where a frame should start, but the "
                        r"file goes on at line 12; ASE would stop reading here and silently ignore the rest")),
], ids=["missing-atom-lines", "cut-mid-line", "header-not-a-count", "non-numeric-coordinate", "blank-line"])
def test_malformed_or_truncated_extxyz_names_file_frame_and_line(tmp_path, damage, expected):
    path = tmp_path / "bad.extxyz"
    path.write_text("".join(damage(three_frames(path))))
    with pytest.raises(DataError, match=expected) as err:
        read_structures(path)
    assert str(err.value).startswith(f"{path}: ")
    if damage in (_cut_last_atom_lines, _cut_mid_line, _blank_then_more):  # the frames before it are fine
        assert [s.frame for s in read_structures(path, index="0:2")] == [0, 1]


def test_empty_and_blank_files(tmp_path):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"^{at(empty)}: file is empty \(0 bytes\): no structures to read$"):
        read_structures(empty)
    blank = tmp_path / "blank.extxyz"
    blank.write_text("\n\n  \n")
    with pytest.raises(DataError, match=rf"^{at(blank)}: contains no structures$"):
        read_structures(blank)
    three_frames(tmp_path / "w.extxyz")
    with pytest.raises(DataError, match="w.extxyz: contains no structures at index '5:'"):
        read_structures(tmp_path / "w.extxyz", index="5:")


def test_empty_file_in_a_config_stops_before_training(tmp_path):
    (tmp_path / "water.extxyz").write_text("")
    with pytest.raises(DataError, match=rf"{at(tmp_path / 'water.extxyz')}: file is empty"):
        train(write_config(tmp_path / "c.yaml", base_config(tmp_path)))
    assert not (tmp_path / "out" / "checkpoints").exists()


# --- non-finite positions and labels ----------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_positions_name_file_frame_field_and_atom(tmp_path, value):
    frames = [labelled_water(0), labelled_water(1)]
    frames[1].positions[2, 1] = value
    path = tmp_path / "p.extxyz"
    ase.io.write(path, frames, format="extxyz")
    message = (rf"^{at(path)}: frame 1, field 'positions': contains NaN or inf "
               rf"\(first at atom 2, component y: {value}\)$")
    for allow in (True, False):  # positions are never masked
        with pytest.raises(DataError, match=message):
            read_structures(path, allow_missing_labels=allow)
    with pytest.raises(DataError, match=r"field 'positions': contains NaN or inf"):
        atoms_to_batch(frames[1], 3.0)


@pytest.mark.parametrize("field", ["energy", "forces"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_labels_are_masked_when_allowed_else_named(tmp_path, field, value):
    frames = [labelled_water(k) for k in range(3)]
    if field == "energy":
        frames[1].calc.results["energy"] = value
        detail = rf"\({value}\)"
    else:
        frames[1].calc.results["forces"][1, 0] = value
        detail = rf"\(first at atom 1, component x: {value}\)"
    path = tmp_path / "labels.extxyz"
    ase.io.write(path, frames, format="extxyz")

    with pytest.raises(DataError, match=rf"^{at(path)}: frame 1, field '{field}': contains NaN or inf {detail} "
                                        r"\(set allow_missing_labels: true to mask it\)$"):
        read_structures(path, allow_missing_labels=False)

    structures = read_structures(path, allow_missing_labels=True)
    graphs = [structure_to_graph(s, 3.0, 0) for s in structures]
    mask = "energy_mask" if field == "energy" else "forces_mask"
    assert graphs[1][mask].tolist() == [False] * len(graphs[1][mask])
    assert graphs[0][mask].all() and graphs[2][mask].all()  # the other frames keep their labels
    other = "forces_mask" if field == "energy" else "energy_mask"
    assert graphs[1][other].all()  # and so does the other label of this frame
    batch = collate(graphs)
    assert torch.isfinite(batch["energy"]).all() and torch.isfinite(batch["forces"]).all()
    pred = {"energy": torch.zeros(3, dtype=torch.float64), "forces": torch.zeros(9, 3, dtype=torch.float64)}
    loss, _ = MaskedLoss(torch.tensor([[1.0, 1.0, 0.0]]))(pred, batch)
    assert torch.isfinite(loss)


def test_nonfinite_label_in_a_training_config(tmp_path):
    frames = [labelled_water(k) for k in range(24)]
    frames[5].calc.results["forces"][0, 2] = np.nan
    ase.io.write(tmp_path / "water.extxyz", frames, format="extxyz")
    strict = tiny_config(tmp_path, "strict", data={"allow_missing_labels": False})
    with pytest.raises(DataError, match=rf"{at(tmp_path / 'water.extxyz')}: frame 5, field 'forces': "
                                        r"contains NaN"):
        train(strict)
    assert not (tmp_path / "strict" / "checkpoints").exists()  # before training
    train(tiny_config(tmp_path, "masked", max_epochs=1))  # allowed by default: masked, trains
    val = [float(r["val_loss"]) for r in read_metrics(tmp_path / "masked") if r.get("val_loss")]
    assert len(val) == 1 and np.isfinite(val[0])


def test_labels_of_the_wrong_shape_name_file_frame_and_field(tmp_path):
    path = tmp_path / "f2.extxyz"
    path.write_text('3\nProperties=species:S:1:pos:R:3:forces:R:2 fidelity=PBE energy=-13.0 pbc="F F F"\n'
                    "O 0 0 0.12 0 0\nH 0 0.76 -0.48 0 0\nH 0 -0.76 -0.48 0 0\n")
    with pytest.raises(DataError, match=rf"^{at(path)}: frame 0, field 'forces': "
                                        r"expected shape \(3, 3\), got \(3, 2\)$"):
        read_structures(path)
    atoms = labelled_water(0)
    atoms.info["my_stress"] = np.arange(5.0)
    ase.io.write(path, [labelled_water(1), atoms], format="extxyz")
    with pytest.raises(DataError, match=rf"^{at(path)}: frame 1, field 'my_stress': expected shape "
                                        r"\(3, 3\), got \(5,\)$"):
        read_structures(path, stress_key="my_stress")
    text = path.read_text().replace("my_stress", "stress")  # ASE itself checks the key 'stress'
    path.write_text(text)
    with pytest.raises(DataError, match=rf"^{at(path)}: cannot be read by ASE: frame 1 \(lines 6-10\): "
                                        r"ValueError: Got info item stress, expecting special 3x3 matrix"):
        read_structures(path)


# --- geometry: overlapping atoms, isolated atoms, cells --------------------------------


@pytest.mark.parametrize("distance", [0.0, 0.05])
def test_overlapping_atoms_in_data_name_file_frame_and_atoms(tmp_path, distance):
    frames = [labelled_water(0), labelled_water(1)]
    frames[1].positions[2] = frames[1].positions[0] + [distance, 0, 0]  # an H on top of the O
    path = tmp_path / "water.extxyz"
    ase.io.write(path, frames + [labelled_water(k) for k in range(2, 24)], format="extxyz")
    message = (rf"{at(path)}: frame 1, field 'positions': atoms 0 and 2 closer than min_distance=0\.1 A "
               rf"\(closest {distance:.3f} A\)")
    structures = read_structures(path)  # reading is fine; the geometry is checked with the neighbour list
    with pytest.raises(DataError, match=message):
        structure_to_graph(structures[1], 3.0, 0)
    assert structure_to_graph(structures[1], 3.0, 0, min_distance=0.0)["edge_index"].shape[1] > 0  # check off
    with pytest.raises(DataError, match=message):  # training stops before it starts ...
        train(tiny_config(tmp_path, "run", files=[{"path": "water.extxyz", "split": {"test": 0, "val": 4}}]))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_overlapping_atoms_in_evaluated_data_are_named(tmp_path, make_model):
    model = make_model(species=(1, 8), fidelities=("PBE",), cutoff=3.0)
    frames = [labelled_water(0), labelled_water(1)]
    frames[0].positions[1] = frames[0].positions[2]
    ase.io.write(tmp_path / "w.extxyz", frames, format="extxyz")
    with pytest.raises(DataError, match=r"w\.extxyz: frame 0, field 'positions': atoms 1 and 2 closer than"):
        evaluate(model, read_structures(tmp_path / "w.extxyz"))


def test_isolated_atoms_are_handled(make_model):
    model = make_model(species=(1, 8), fidelities=("PBE",), cutoff=3.0).train()
    systems = {
        "single atom": Atoms("O", positions=[[0, 0, 0]]),
        "no neighbours at all": Atoms("OH", positions=[[0, 0, 0], [5.0, 0, 0]]),
        "one isolated atom": Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [0, 8.0, 0]]),
        "water": molecule("H2O"),
    }
    graphs = []
    for name, atoms in systems.items():
        atoms.info.update(fidelity="PBE", energy=-1.0)
        atoms.arrays["forces"] = np.zeros((len(atoms), 3))
        graphs.append(structure_to_graph(structure_from_atoms(atoms, source=name), 3.0, 0))
    assert [g["edge_index"].shape[1] for g in graphs] == [0, 0, 2, 6]
    batch = collate(graphs)
    out = model(batch, compute_forces=True, compute_stress=True)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    isolated = [0, 1, 2, 5]  # atoms with no neighbour feel no force
    assert torch.equal(out["forces"][isolated], torch.zeros(4, 3, dtype=out["forces"].dtype))
    for k, g in enumerate(graphs):  # batching does not mix them up
        alone = model(collate([g]), compute_forces=True)
        torch.testing.assert_close(alone["energy"][0], out["energy"][k])
    loss, _ = MaskedLoss(torch.tensor([[1.0, 1.0, 0.0]]))(out, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    single = Atoms("O", positions=[[0, 0, 0]])
    single.calc = MFCalculator(model, fidelity="PBE")
    assert np.isfinite(single.get_potential_energy()) and not single.get_forces().any()


@pytest.mark.parametrize("cell, pbc", [
    (np.zeros((3, 3)), True),  # periodic with no cell at all
    ([[3.0, 0, 0], [3.0, 0, 0], [0, 0, 3.0]], True),  # two equal lattice vectors
    ([[3.0, 0, 0], [0, 0, 0], [0, 0, 20.0]], [True, True, False]),  # a slab with a zero periodic vector
])
def test_periodic_cell_of_zero_volume_names_file_frame_and_field(tmp_path, cell, pbc):
    atoms = labelled_water(0)
    atoms.set_cell(cell)
    atoms.pbc = pbc
    path = tmp_path / "cell.extxyz"
    ase.io.write(path, [labelled_water(1), atoms], format="extxyz")
    (_, s) = read_structures(path)
    with pytest.raises(DataError, match=rf"^{at(path)}: frame 1, field 'cell': periodic cell of zero volume: "
                                        r"the lattice vectors of the periodic directions \(ab?c?\) are zero or "
                                        r"linearly dependent"):
        structure_to_graph(s, 3.0, 0)
    atoms.calc = MFCalculator(_si_model(species=(1, 8)), fidelity="PBE")
    with pytest.raises(ValueError, match="field 'cell': periodic cell of zero volume"):
        atoms.get_potential_energy()


def _si_model(species=(14,)):
    from mfmlip.model import MFPotential, ModelSpec

    torch.manual_seed(0)
    spec = ModelSpec(species=list(species), fidelities=["PBE"], cutoff=4.0, channels=8, lmax=1, num_layers=2,
                     avg_num_neighbors=10.0)
    return MFPotential(spec).double().eval()


def test_partly_periodic_cell_with_zero_vectors_is_handled():
    model = _si_model()
    slab = bulk("Si", "diamond", a=5.43, cubic=True)
    slab.rattle(0.05, seed=2)
    vacuum = slab.copy()
    vacuum.cell[2] = [0, 0, 30.0]
    vacuum.pbc = [True, True, False]
    zero = vacuum.copy()
    zero.cell[2] = [0, 0, 0]  # zero volume, but c is not periodic: nothing to refuse
    wire = vacuum.copy()
    wire.pbc = [True, False, False]
    wire_zero = wire.copy()
    wire_zero.cell[1:] = 0
    for a, b in ((vacuum, zero), (wire, wire_zero)):
        pa, pb = predict(model, a), predict(model, b)
        torch.testing.assert_close(pa["energy"], pb["energy"])
        torch.testing.assert_close(pa["forces"], pb["forces"])
    assert not torch.allclose(predict(model, vacuum)["energy"], predict(model, wire)["energy"])


def test_cell_smaller_than_the_cutoff_is_handled():
    model = _si_model()  # cutoff 4 A
    small = Atoms("Si2", scaled_positions=[[0, 0, 0], [0.45, 0.52, 0.48]],
                  cell=[[2.6, 0.0, 0.0], [0.3, 2.7, 0.0], [0.2, -0.1, 2.5]], pbc=True)  # every vector < 4 A
    big = small.repeat((3, 2, 2))
    p_small, p_big = predict(model, small, stress=True), predict(model, big, stress=True)
    n = len(big) // len(small)
    assert torch.isfinite(p_small["energy"]).all()
    torch.testing.assert_close(p_big["energy"], n * p_small["energy"])
    torch.testing.assert_close(p_big["forces"], p_small["forces"].repeat(n, 1))
    torch.testing.assert_close(p_big["stress"], p_small["stress"])
    assert p_small["forces"].abs().max() > 1e-3  # not trivially zero


# --- what the model does not know -----------------------------------------------------------


def test_element_not_in_the_model(tmp_path, make_model):
    model = make_model(species=(1, 8), fidelities=("PBE", "MP2"), cutoff=3.0)
    methanol = molecule("CH3OH")
    methanol.info.update(fidelity="PBE", energy=-1.0)
    structure = structure_from_atoms(methanol, source="m.extxyz: frame 3")
    with pytest.raises(ValueError, match=r"^m.extxyz: frame 3 .. m.extxyz: frame 3: element\(s\) \['C'\] "
                       r"unknown to this model; it knows \['H', 'O'\]$"):
        evaluate(model, [structure])


def test_element_only_in_the_test_split_is_a_clear_error(tmp_path):
    methanol = molecule("CH3OH")
    methanol.info.update(fidelity="PBE", energy=-1.0)
    ase.io.write(tmp_path / "other.extxyz", methanol, format="extxyz")
    files = [{"path": "water.extxyz", "split": {"train": None, "val": 4, "test": 0}},
             {"path": "other.extxyz", "split": {"train": 0, "val": 0, "test": None}}]
    with pytest.raises(DataError, match=r"other.extxyz: frame 0: test structure with elements \[6\]"):
        train(tiny_config(tmp_path, "run", files=files, max_epochs=1))
    assert not (tmp_path / "run" / "model.pt").exists()  # refused before training


def test_fidelity_not_in_the_model(make_model):
    model = make_model(species=(1, 8), fidelities=("PBE", "MP2"), cutoff=3.0)
    water = structure_from_atoms(labelled_water(0, fidelity="CCSD(T)"))
    listing = r"unknown fidelity 'CCSD\(T\)'; this model has \['PBE', 'MP2'\]"
    with pytest.raises(ValueError, match=listing):  # each structure at its own fidelity
        evaluate(model, [water])
    with pytest.raises(ValueError, match=listing):  # all at a chosen one
        evaluate(model, [structure_from_atoms(labelled_water(0))], fidelity="CCSD(T)")


# --- configs ------------------------------------------------------------------------------


def test_config_nested_unknown_keys_and_wrong_types_name_their_key_paths(tmp_path):
    cfg = base_config(tmp_path)
    cfg["data"]["files"][0]["fidelty"] = "PBE"
    cfg["data"]["files"][0]["split"]["val"] = "ten"
    cfg["data"]["allow_missing_labels"] = "sometimes"
    cfg["model"]["cutoff"] = -1.0
    cfg["training"]["weights"] = {"energy": 1.0, "force": 10.0}
    path = write_config(tmp_path / "c.yaml", cfg)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: invalid config"
    for key in ("data.files.0.fidelty: unknown key", "data.files.0.split.val", "data.allow_missing_labels",
                "model.cutoff: Input should be greater than 0", "training.weights.force: unknown key"):
        assert any(line.strip().startswith(key) for line in lines), key
    write_config(path, dict(base_config(tmp_path), data={"files": "water.extxyz"}))
    with pytest.raises(ConfigError, match=r"data\.files: Input should be a valid list"):
        load_config(path)


def test_config_missing_files_are_named(tmp_path):
    write_water(tmp_path / "water.extxyz", n=12)
    cfg = base_config(tmp_path)
    cfg["data"]["files"][0]["split"] = {"file": "splits.yaml"}
    with pytest.raises(DataError, match=rf"{at(tmp_path / 'splits.yaml')}.*not found"):
        train(write_config(tmp_path / "c.yaml", cfg))
    cfg = base_config(tmp_path)
    for key in ("init_from", "delta_from"):  # named before any data is read
        cfg["training"][key] = str(tmp_path / "missing.pt")
        with pytest.raises(ConfigError, match=rf"training.{key}: model file {at(tmp_path / 'missing.pt')} not found"):
            train(write_config(tmp_path / "c.yaml", cfg))
        del cfg["training"][key]


def test_data_root_that_does_not_exist(tmp_path, capsys):
    cfg = base_config(tmp_path)
    cfg["data"]["root"] = "no/such/folder"  # relative to the config file
    path = write_config(tmp_path / "c.yaml", cfg)
    with pytest.raises(ConfigError, match=rf"^data root {at(tmp_path / 'no/such/folder')} does not exist "
                                          r"\(set it with --data-root, the MFMLIP_DATA environment variable, "
                                          r"or data\.root"):
        train(path)
    assert main(["train", str(path), "--data-root", str(tmp_path / "elsewhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mfmlip train: error: data root {tmp_path / 'elsewhere'} does not exist")


# --- names in a config that match nothing (issue 13, class 1) -------------------------


def _mace_style(path: Path, n: int = 24) -> Path:
    """Water frames whose labels are stored as REF_energy / REF_forces, as MACE data sets do."""
    frames = []
    for k in range(n):
        atoms = labelled_water(k)
        atoms.info["REF_energy"], atoms.arrays["REF_forces"] = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = None
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return path


def _prepare(tmp_path, entry: dict, **data):
    from mfmlip.training.data import prepare_data

    return prepare_data(load_config(tiny_config(tmp_path, "run", files=[entry], data=data)), tmp_path)


@pytest.mark.parametrize("entry, problem, advice", [
    ({"path": "water.extxyz", "forces_key": "REF_forces"},
     "forces_key 'REF_forces' matches no frame; did you mean forces_key: forces?", ", or train without the label "
     "with labels: [energy]"),
    ({"path": "mace.extxyz"},
     "energy_key 'energy' matches no frame; did you mean energy_key: REF_energy?; forces_key 'forces' matches "
     "no frame; did you mean forces_key: REF_forces?", ""),
    ({"path": "mace.extxyz", "energy_key": "REF_energy", "forces_key": "REF_force"},
     "forces_key 'REF_force' matches no frame; did you mean forces_key: REF_forces?", ", or train without the "
     "label with labels: [energy]"),
    ({"path": "water.extxyz", "stress_key": "virial"}, "stress_key 'virial' matches no frame",
     ", or train without the label with labels: [energy, forces]"),
    ({"path": "water.extxyz", "labels": ["energy", "stress"]}, "stress_key 'stress' matches no frame",
     ", or train without the label with labels: [energy]"),
], ids=["explicit-key", "mace-file-default-keys", "misspelt-key", "explicit-stress-key", "listed-label"])
def test_label_key_that_no_frame_has_names_the_key_the_file_and_what_frames_have(tmp_path, entry, problem, advice):
    write_water(tmp_path / "water.extxyz")
    _mace_style(tmp_path / "mace.extxyz")
    path = tmp_path / entry["path"]
    with pytest.raises(ConfigError) as err:
        _prepare(tmp_path, dict(entry, split={"train": None, "val": 4, "test": 4}))
    have = "REF_energy, REF_forces, fidelity" if "mace" in entry["path"] else "energy, fidelity, forces"
    expected = f"data.files[0] ({path}, index ':'): {problem}. The frames have {have}. Set the key{advice}"
    assert str(err.value) == expected


def test_label_keys_that_match_or_labels_left_out_are_accepted_and_counted(tmp_path):
    write_water(tmp_path / "water.extxyz")
    _mace_style(tmp_path / "mace.extxyz")
    split = {"train": None, "val": 4, "test": 4}
    data = _prepare(tmp_path, {"path": "mace.extxyz", "energy_key": "REF_energy", "forces_key": "REF_forces",
                               "split": split})
    assert data.report[0].startswith("mace.extxyz [PBE]: 24 frames (labels: energy 24, forces 24, stress 0)")
    data = _prepare(tmp_path, {"path": "mace.extxyz", "energy_key": "REF_energy", "labels": ["energy"],
                               "split": split})  # forces left out: REF_forces is not asked for
    assert "(labels: energy 24, forces 0 unused, stress 0 unused)" in data.report[0]
    data = _prepare(tmp_path, {"path": "water.extxyz", "split": split})  # no stress by default: nothing to name
    assert "(labels: energy 24, forces 24, stress 0)" in data.report[0]


def test_frames_without_some_labels_are_masked_not_an_error(tmp_path):
    frames = [labelled_water(k) for k in range(24)]
    for atoms in frames[:3]:  # the first frames have energies only
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy())
    ase.io.write(tmp_path / "water.extxyz", frames, format="extxyz")
    data = _prepare(tmp_path, {"path": "water.extxyz", "split": {"train": None, "val": 4, "test": 4}})
    assert "(labels: energy 24, forces 21, stress 0)" in data.report[0]
    with pytest.raises(ConfigError, match=r"forces_key 'forces' matches no frame"):  # unless no frame has them
        _prepare(tmp_path, {"path": "water.extxyz", "index": "0:3", "labels": ["energy", "forces"],
                            "split": {"train": 1, "val": 1, "test": 1}})


def test_file_without_any_label_is_an_error(tmp_path):
    frames = [labelled_water(k) for k in range(6)]
    for atoms in frames:
        atoms.calc = None
    ase.io.write(tmp_path / "bare.extxyz", frames, format="extxyz")
    with pytest.raises(ConfigError, match=rf"^data\.files\[0\] \({at(tmp_path / 'bare.extxyz')}, index ':'\): "
                                          r"energy_key 'energy' matches no frame; forces_key 'forces' matches no "
                                          r"frame; stress_key 'stress' matches no frame\. The frames have fidelity\. "
                                          r"Set the key$"):
        _prepare(tmp_path, {"path": "bare.extxyz", "split": {"train": 4, "val": 2}})


def test_fidelity_weights_naming_no_fidelity_of_the_data_is_an_error(tmp_path, capsys):
    config = tiny_config(tmp_path, "run", fidelity_weights={"pbe": {"energy": 10.0}, "MP2": {"forces": 1.0}})
    with pytest.raises(ConfigError, match=r"^training\.fidelity_weights: \['pbe', 'MP2'\] are not a fidelity of the "
                                          r"data; its fidelities are \['PBE'\] \(did you mean 'pbe' -> 'PBE'\?\)$"):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert main(["train", str(config)]) == 2
    assert "mfmlip train: error: training.fidelity_weights: ['pbe', 'MP2']" in capsys.readouterr().err


def test_fidelity_without_any_energy_names_the_fidelity_its_files_and_key(tmp_path):
    write_water(tmp_path / "water.extxyz")
    frames = [labelled_water(k, fidelity="MP2") for k in range(8)]
    for atoms in frames:  # forces only
        atoms.calc = SinglePointCalculator(atoms, forces=atoms.get_forces())
    ase.io.write(tmp_path / "mp2.extxyz", frames, format="extxyz")
    files = [{"path": "water.extxyz", "split": {"train": None, "val": 4, "test": 0}},
             {"path": "mp2.extxyz", "split": {"train": None, "val": 2, "test": 0}}]
    with pytest.raises(DataError, match=r"^fidelity 'MP2': no training structure has an energy, so its E0 cannot be "
                                        r"fitted \(from data\.files\[1\] mp2\.extxyz, energy_key 'energy'\); check "
                                        r"energy_key and labels, or give data\.e0\['MP2'\]$"):
        train(tiny_config(tmp_path, "run", files=files))
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- a run never silently replaces or mixes with an earlier one (issue 13, class 2) -------


def test_second_run_into_the_same_folder_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    from mfmlip.training.rundir import resolved_config

    config = tiny_config(tmp_path, "run", max_epochs=1)
    run = tmp_path / "run"
    train(config)
    out = capsys.readouterr().out
    assert "water.extxyz [PBE]: 24 frames (labels: energy 24, forces 24, stress 0), 0 dropped" in out
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored == resolved_config(load_config(config), tmp_path)  # the resolved config, data root included
    before = {p: p.read_bytes() for p in (run / "model.pt", run / "checkpoints" / "last.ckpt")}

    message = (rf"^output_dir {at(run)} holds an earlier run \(checkpoints/best\.ckpt, checkpoints/last\.ckpt, "
               r"model\.pt\); use --resume to continue it, --overwrite to replace it, or another output_dir$")
    with pytest.raises(ConfigError, match=message):
        train(config)
    assert main(["train", str(config)]) == 2
    assert re.match(f"mfmlip train: error: {message[1:]}", capsys.readouterr().err)
    assert {p: p.read_bytes() for p in before} == before  # untouched
    with pytest.raises(ConfigError, match="--resume and --overwrite exclude each other"):
        train(config, resume=True, overwrite=True)

    stale = [run / "checkpoints" / "epoch=7.ckpt", run / "logs" / "version_0" / "notes.txt"]
    for path in stale:
        path.write_text("from the earlier run")
    written = (run / "model.pt").stat().st_mtime_ns
    assert main(["train", str(config), "--overwrite"]) == 0
    assert not any(path.exists() for path in stale)  # the earlier run was deleted first
    assert (run / "model.pt").stat().st_mtime_ns != written
    assert {int(r["epoch"]) for r in read_metrics(run)} == {0}


def test_resume_refuses_a_config_that_changes_the_model_or_the_data(tmp_path):
    config = tiny_config(tmp_path, "run", max_epochs=1)
    run = tmp_path / "run"
    train(config)
    raw = yaml.safe_load(config.read_text())
    changed = dict(raw, seed=1, model=dict(raw["model"], channels=16),
                   training=dict(raw["training"], max_epochs=2, patience=7, num_workers=0, max_time_minutes=5.0))
    changed["data"]["files"][0]["split"]["val"] = 5
    config.write_text(yaml.safe_dump(changed))
    with pytest.raises(ConfigError) as err:
        train(config, resume=True)
    lines = str(err.value).splitlines()
    assert lines[0] == (f"--resume: the config changes the model or the data of the run in {run} "
                        f"({run / 'config.yaml'}):")
    assert [line.strip() for line in lines[1:-1]] == [
        "data.files.0.split.val: 4 -> 5", "model.channels: 8 -> 16", "seed: 0 -> 1"]  # not the training keys
    assert lines[-1].startswith("revert these keys to continue the run")

    changed.update(seed=0, model=raw["model"])
    changed["data"]["files"][0]["split"]["val"] = 4
    config.write_text(yaml.safe_dump(changed))
    train(config, resume=True)  # max_epochs, patience, max_time_minutes may change
    assert {int(r["epoch"]) for r in read_metrics(run)} == {0, 1}
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["max_epochs"] == 2

    shutil.rmtree(run / "checkpoints")  # a finished run with nothing to resume from
    with pytest.raises(ConfigError, match=rf"^--resume: {at(run)} holds a run \(model\.pt\) but no "
                                          r"checkpoints/last\.ckpt to continue from; use --overwrite to replace it$"):
        train(config, resume=True)


def test_changed_keys_compare_what_makes_the_model_and_the_data():
    from mfmlip.training.rundir import changed_keys

    old = {"seed": 0, "output_dir": "a", "data": {"root": "/x", "files": [{"path": "a.xyz"}]},
           "model": {"cutoff": 4.0}, "training": {"lr": 0.01, "device": "cpu", "init_from": None}}
    new = {"seed": 0, "output_dir": "b", "data": {"root": "/y", "files": [{"path": "a.xyz"}, {"path": "b.xyz"}]},
           "model": {"cutoff": 5.0}, "training": {"lr": 0.001, "device": "cuda", "init_from": "m.pt"}}
    assert changed_keys(old, new) == ["data.files.1.path: '(absent)' -> 'b.xyz'", "model.cutoff: 4.0 -> 5.0",
                                      "training.init_from: None -> 'm.pt'"]
    assert changed_keys(old, old) == []


def test_study_runs_resume_in_their_folders_and_refuse_a_changed_model(tmp_path, data_dir):
    from test_study import rows, tiny_study

    path = tiny_study(tmp_path, quick={"methods": ["single_fidelity"], "fractions": [1.0]})
    command = ["study", str(path), "--quick", "--data-root", str(data_dir)]
    assert main(command) == 0
    (row,) = rows(tmp_path)
    folder = tmp_path / "study_quick" / "runs" / "single_fidelity" / "f1_seed0"
    assert row["status"] == "done" and (folder / "config.yaml").is_file()
    (folder / "status.json").unlink()  # as if killed before it could record the end
    first_fit = read_metrics(folder)
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(dict(raw, model=dict(raw["model"], channels=8))))
    assert main(command) == 0
    (row,) = rows(tmp_path)
    assert row["status"] == "failed" and "model.channels: 16 -> 8" in row["error"]
    path.write_text(yaml.safe_dump(raw))
    assert main(command) == 0  # the same study again: the run resumes in its folder
    (row,) = rows(tmp_path)
    assert row["status"] == "done"
    assert read_metrics(folder)[: len(first_fit)] == first_fit  # resumed: a new run would clear the logs


# --- every CLI option is checked where it enters (issue 13, class 4) ----------------------

BAD_DEVICE = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
_EVAL = ["evaluate", "m.pt", "d.xyz", "--fidelity", "PBE"]
_SIM = ["m.pt", "s.xyz", "--fidelity", "PBE"]
_MD = ["md", *_SIM, "--ensemble", "nvt", "--steps", "5"]
_SAMPLE = ["sample", "m.pt", "c.xyz", "-o", "out.xyz"]
POSITIVE_INT, POSITIVE, NON_NEGATIVE = "expected a positive integer", "expected a number > 0", "expected a number >= 0"
INDEX = "expected an ASE index: an integer"
BAD_OPTIONS = [
    (["train", "c.yaml", "--resume", "--overwrite"], "--overwrite", "not allowed with argument --resume"),
    ([*_EVAL, "--index", "0-10"], "--index", INDEX),
    ([*_EVAL, "--batch-size", "0"], "--batch-size", POSITIVE_INT),
    ([*_EVAL, "--batch-size", "many"], "--batch-size", POSITIVE_INT),
    ([*_EVAL, "--device", BAD_DEVICE], "--device", "CUDA"),
    ([*_EVAL, "--device", "gpu0"], "--device", "expected a device (cpu, cuda, cuda:N or mps)"),
    (["relax", *_SIM, "--index", "last"], "--index", INDEX),
    (["relax", *_SIM, "--device", "tpu"], "--device", "expected a device"),
    (["relax", *_SIM, "--dtype", "fp64"], "--dtype", "invalid choice: fp64 (choose from float32, float64)"),
    (["relax", *_SIM, "--min-distance", "-1"], "--min-distance", NON_NEGATIVE),
    (["relax", *_SIM, "--fmax", "0"], "--fmax", POSITIVE),
    (["relax", *_SIM, "--optimizer", "BFGS"], "--optimizer", "choose from LBFGS, FIRE"),
    (["relax", *_SIM, "--steps", "0"], "--steps", POSITIVE_INT),
    (["relax", *_SIM, "--pressure", "inf"], "--pressure", "expected a finite number"),
    (["eos", *_SIM, "--points", "-3"], "--points", POSITIVE_INT),
    (["eos", *_SIM, "--range", "0", "1.1"], "--range", POSITIVE),
    (["eos", *_SIM, "--fmax", "nan"], "--fmax", POSITIVE),
    (["eos", *_SIM, "--relax-steps", "-1"], "--relax-steps", "expected an integer >= 0"),
    ([*_MD, "--ensemble", "nph"], "--ensemble", "choose from nvt, npt, nve"),
    ([*_MD, "--temperature", "-300"], "--temperature", NON_NEGATIVE),
    ([*_MD, "--pressure", "1e"], "--pressure", "expected a finite number"),
    ([*_MD, "--timestep", "0"], "--timestep", POSITIVE),
    ([*_MD, "--steps", "-5"], "--steps", POSITIVE_INT),
    ([*_MD, "--seed", "1.5"], "--seed", "expected an integer"),
    ([*_MD, "--thermostat", "berendsen"], "--thermostat", "choose from langevin, nose-hoover"),
    ([*_MD, "--barostat", "nose"], "--barostat", "choose from mtk, berendsen"),
    ([*_MD, "--friction", "-0.1"], "--friction", NON_NEGATIVE),
    ([*_MD, "--tdamp", "0"], "--tdamp", POSITIVE),
    ([*_MD, "--pdamp", "-1"], "--pdamp", POSITIVE),
    ([*_MD, "--compressibility", "0"], "--compressibility", POSITIVE),
    ([*_MD, "--log-interval", "0"], "--log-interval", POSITIVE_INT),
    ([*_MD, "--traj-interval", "0"], "--traj-interval", POSITIVE_INT),
    ([*_MD, "--checkpoint-interval", "0"], "--checkpoint-interval", POSITIVE_INT),
    ([*_MD, "--device", BAD_DEVICE], "--device", "CUDA"),
    (["rdf", "t.traj", "--pairs", "O-H", "--index", "1-2"], "--index", INDEX),
    (["rdf", "t.traj", "--pairs", "O-H", "--rmax", "0"], "--rmax", POSITIVE),
    (["rdf", "t.traj", "--pairs", "O-H", "--bins", "0"], "--bins", POSITIVE_INT),
    (["adf", "t.traj", "--triplet", "H-O-H", "--cutoff", "-2"], "--cutoff", POSITIVE),
    (["adf", "t.traj", "--triplet", "H-O-H", "--cutoff", "2", "--bins", "0"], "--bins", POSITIVE_INT),
    (["coordination", "t.traj", "--pair", "O-H", "--cutoff", "0"], "--cutoff", POSITIVE),
    ([*_SAMPLE, "--n", "0"], "--n", POSITIVE_INT),
    ([*_SAMPLE, "--method", "kmeans"], "--method", "choose from direct, random, narrow"),
    ([*_SAMPLE, "--seed", "x"], "--seed", "expected an integer"),
    ([*_SAMPLE, "--index", "0-10"], "--index", INDEX),
    ([*_SAMPLE, "--pooling", "max"], "--pooling", "choose from mean, species"),
    ([*_SAMPLE, "--batch-size", "0"], "--batch-size", POSITIVE_INT),
    ([*_SAMPLE, "--device", BAD_DEVICE], "--device", "CUDA"),
    ([*_SAMPLE, "--n-clusters", "0"], "--n-clusters", POSITIVE_INT),
    ([*_SAMPLE, "--k", "-1"], "--k", POSITIVE_INT),
    ([*_SAMPLE, "--pcs", "0"], "--pcs", "expected 'kaiser' or a positive integer"),
    ([*_SAMPLE, "--pick", "first"], "--pick", "choose from center, random"),
    ([*_SAMPLE, "--threshold", "0"], "--threshold", POSITIVE),
    (["study", "s.yaml", "--jobs", "0"], "--jobs", POSITIVE_INT),
]


@pytest.mark.parametrize("argv, option, accepted", BAD_OPTIONS, ids=[f"{a[0]} {o} {a[-1]}" for a, o, _ in BAD_OPTIONS])
def test_every_cli_option_with_a_bad_value_exits_2_naming_it(argv, option, accepted, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse stops before any file is opened
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.replace("'", "")  # Python versions differ in quoting choices
    assert f"mfmlip {argv[0]}: error: argument {option}" in err and accepted.replace("'", "") in err


@pytest.fixture
def cli_files(tmp_path, make_model):
    from mfmlip.model.serialization import save_model

    save_model(make_model(species=(1, 8, 14), fidelities=("PBE",), cutoff=3.0), tmp_path / "m.pt")
    write_water(tmp_path / "w.extxyz", n=3)
    ase.io.write(tmp_path / "si.extxyz", bulk("Si", "diamond", a=5.43), format="extxyz")
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "m.pt", "w.extxyz", "--fidelity", "MP2"], r"unknown fidelity 'MP2'; this model has \['PBE'\]"),
    (["relax", "m.pt", "si.extxyz", "--fidelity", "pbe"], r"unknown fidelity 'pbe'"),
    (["eos", "m.pt", "si.extxyz", "--fidelity", "PBE", "--points", "3"], r"need at least 5 points"),
    (["eos", "m.pt", "si.extxyz", "--fidelity", "PBE", "--eos", "murnagan"], r"unknown EOS 'murnagan'; ASE offers"),
    (["eos", "m.pt", "si.extxyz", "--fidelity", "PBE", "--range", "1.1", "0.9"],
     r"volume_range must be 0 < low < high"),
    (["md", "m.pt", "si.extxyz", "--fidelity", "PBE", "--ensemble", "nvt", "--steps", "2"], r"temperature"),
    (["sample", "m.pt", "w.extxyz", "-o", "p.extxyz", "--method", "random"], r"give --n"),
    (["sample", "m.pt", "w.extxyz", "-o", "p.extxyz", "--n", "2", "--method", "random", "--k", "1"],
     r"--k only appl"),
    (["sample", "m.pt", "w.extxyz", "-o", "p.extxyz", "--n", "2", "--method", "narrow"], r"needs --region"),
    (["info", "missing.pt"], r"model file missing\.pt not found"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_values_checked_against_the_model_or_data_exit_2_naming_them(cli_files, monkeypatch, capsys, argv,
                                                                         message):
    monkeypatch.chdir(cli_files)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mfmlip {argv[0]}: error: ") and re.search(message, err), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_training_device_this_machine_lacks_is_refused_before_reading_data(tmp_path, capsys):
    config = tiny_config(tmp_path, "run", device="cuda")
    (tmp_path / "water.extxyz").write_text("not read")
    with pytest.raises(ConfigError, match=r"^training\.device 'cuda': CUDA is not available on this machine "
                                          r"\(torch .*\); use cpu$"):
        train(config)
    assert main(["train", str(config)]) == 2
    assert "mfmlip train: error: training.device 'cuda': CUDA is not available" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"training\.device: Input should be 'cpu', 'cuda', 'gpu', 'mps' or 'auto'"):
        train(tiny_config(tmp_path, "other", device="gpu0"))


# --- reading errors blame the frame whose count is wrong (issue 13, class 6) ---------------


@pytest.mark.parametrize("count, frame, expected", [
    (5, 0, r"frame 0 \(line 1\) declares 5 atoms but has 3 atom lines: line 6 \('3'\) starts the next frame"),
    (2, 0, r"frame 0 \(line 1\) declares 2 atoms but has at least 3: line 5 is an atom line where frame 1 "
           r"should start"),
    (4, 1, r"frame 1 \(line 6\) declares 4 atoms but has 3 atom lines: line 11 \('3'\) starts the next frame"),
    (1, 1, r"frame 1 \(line 6\) declares 1 atoms but has at least 3: line 9 is an atom line where frame 2 "
           r"should start"),
])
def test_atom_count_that_does_not_match_names_that_frame_and_line(tmp_path, count, frame, expected):
    path = tmp_path / "count.extxyz"
    lines = three_frames(path)
    lines[5 * frame] = f"{count}\n"
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=rf"^{at(path)}: cannot be read: {expected}$"):
        read_structures(path)


# --- evaluate on a file without labels (issue 13, class 7) -------------------------------


def test_evaluate_without_labels_says_so_and_writes_predictions_if_asked(tmp_path, make_model, capsys):
    from mfmlip.model.serialization import save_model

    save_model(make_model(species=(1, 8), fidelities=("PBE",), cutoff=3.0), tmp_path / "m.pt")
    bare = [labelled_water(k) for k in range(4)]
    for atoms in bare:
        atoms.calc = None
    ase.io.write(tmp_path / "bare.extxyz", bare, format="extxyz")
    out = tmp_path / "out"
    command = ["evaluate", str(tmp_path / "m.pt"), str(tmp_path / "bare.extxyz"), "--fidelity", "PBE", "-o", str(out)]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mfmlip evaluate: error: {tmp_path / 'bare.extxyz'}: no frame (index ':') has an energy "
                          "or force label under --energy-key 'energy' or --forces-key 'forces'; the frames have "
                          "fidelity. Name the keys, or give --predictions-only")
    assert not out.exists()  # no empty table, JSON or plot

    assert main([*command, "--predictions-only", "--index", "1:"]) == 0
    written = ase.io.read(out / "predictions_bare_PBE.extxyz", ":")
    assert [a.info["source_index"] for a in written] == [1, 2, 3]
    assert all(np.isfinite(a.get_potential_energy()) and a.get_forces().shape == (3, 3) for a in written)
    assert sorted(p.name for p in out.iterdir()) == ["predictions_bare_PBE.extxyz"]

    _mace_style(tmp_path / "mace.extxyz", n=4)  # labels under other keys: name them
    assert main(["evaluate", str(tmp_path / "m.pt"), str(tmp_path / "mace.extxyz"), "--fidelity", "PBE", "-o",
                 str(out), "--energy-key", "REF_energy", "--forces-key", "REF_forces"]) == 0
    assert (out / "metrics_mace_PBE.json").is_file()


def test_a_closed_output_pipe_ends_the_command_quietly(monkeypatch, capsys):
    import mfmlip.cli.main as cli

    def reader_left(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_info", reader_left)
    assert main(["info", "m.pt"]) == 1
    assert capsys.readouterr().err == ""


def test_an_unexpected_error_in_a_command_ends_in_a_message_not_a_traceback(monkeypatch, capsys):
    import mfmlip.cli.main as cli

    def broken(args):
        raise RuntimeError("something deep in torch")

    monkeypatch.setattr(cli, "_info", broken)
    assert main(["info", "m.pt"]) == 1
    assert capsys.readouterr().err == ("mfmlip info: unexpected error: RuntimeError: something deep in torch "
                                       "(set MFMLIP_TRACEBACK=1 to see where; please report it)\n")
    monkeypatch.setenv("MFMLIP_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="something deep in torch"):
        main(["info", "m.pt"])


def test_resume_refuses_a_split_file_whose_frames_changed(tmp_path):
    (tmp_path / "split.yaml").write_text(yaml.safe_dump({"train": list(range(16)), "val": [16, 17, 18, 19]}))
    config = tiny_config(tmp_path, "run", files=[{"path": "water.extxyz", "split": {"file": "split.yaml"}}],
                         max_epochs=1)
    train(config)
    assert (tmp_path / "run" / "split_files.json").is_file()
    (tmp_path / "split.yaml").write_text(yaml.safe_dump({"train": list(range(1, 17)), "val": [17, 18, 19, 20]}))
    with pytest.raises(ConfigError) as err:
        train(config, resume=True)
    assert str(err.value).splitlines()[1].strip() == "data.files.0.split.file: split.yaml changed since the run started"


# --- merged from the former test_errors.py: first-line checks of files, configs and models ---


def write_frames(path, frames):
    ase.io.write(path, frames, format="extxyz")
    return path


def water(energy=-14.0, fidelity="PBE", **info):
    atoms = molecule("H2O")
    if fidelity is not None:
        atoms.info["fidelity"] = fidelity
    atoms.info["energy"] = energy
    atoms.info.update(info)
    return atoms


# --- data files -----------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as err:
        read_structures(tmp_path / "absent.extxyz")
    assert "absent.extxyz" in str(err.value)


@pytest.mark.parametrize(
    "content",
    [
        "this is not xyz\nfoo bar\n",
        '9\nProperties=species:S:1:pos:R:3 fidelity=X energy=1.0 pbc="F F F"\nH 0 0 0\nH 1 0 0\n',
    ],
    ids=["garbage", "truncated-frame"],
)
def test_malformed_file_names_the_file(tmp_path, content):
    path = tmp_path / "bad.extxyz"
    path.write_text(content)
    with pytest.raises(DataError, match="cannot be read") as err:
        read_structures(path)
    assert str(path) in str(err.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.extxyz"
    path.write_text("")
    with pytest.raises(DataError) as err:
        read_structures(path)
    assert str(path) in str(err.value) and "mpty" in str(err.value)


def test_frame_without_fidelity_names_frame_and_fidelity(tmp_path):
    path = write_frames(tmp_path / "f.extxyz", [water(), water(), water(fidelity=None)])
    with pytest.raises(DataError, match="fidelity") as err:
        read_structures(path)
    assert f"{path}: frame 2" in str(err.value)
    # a fidelity given by the config entry fills the gap
    assert [s.fidelity for s in read_structures(path, fidelity="MP2")] == ["MP2"] * 3


def test_forces_of_wrong_shape_name_file_frame_and_field(tmp_path):
    atoms = molecule("NH3")  # 4 atoms: forces must be (4, 3)
    atoms.info.update(fidelity="PBE", energy=-1.0, my_forces=np.arange(9.0))
    path = write_frames(tmp_path / "f.extxyz", [water(), atoms])
    with pytest.raises(DataError, match=r"expected shape \(4, 3\)") as err:
        read_structures(path, forces_key="my_forces")
    assert f"{path}: frame 1, field 'my_forces'" in str(err.value)


def test_six_force_values_for_three_atoms_are_rejected(tmp_path):
    path = write_frames(tmp_path / "f.extxyz", [water(my_forces=np.arange(6.0))])
    with pytest.raises(DataError, match="my_forces"):
        read_structures(path, forces_key="my_forces")


def test_non_numeric_label_names_field():
    atoms = water(energy="high")
    with pytest.raises(DataError, match=r"frame 4, field 'energy': not numeric"):
        structure_from_atoms(atoms, source="x.extxyz: frame 4")


def test_nan_energy_is_masked_when_allowed_and_an_error_otherwise(tmp_path):
    path = write_frames(tmp_path / "n.extxyz", [water(-14.0), water(float("nan"))])
    structures = read_structures(path, allow_missing_labels=True)
    assert structures[0].energy == -14.0 and np.isnan(structures[1].energy)
    from mfmlip.data import structure_to_graph

    assert structure_to_graph(structures[1], 5.0, 0)["energy_mask"].tolist() == [False]
    with pytest.raises(DataError, match="NaN") as err:
        read_structures(path, allow_missing_labels=False)
    assert f"{path}: frame 1, field 'energy'" in str(err.value)
    assert "allow_missing_labels" in str(err.value)


def test_nan_positions_are_rejected_with_field():
    atoms = water()
    atoms.positions[1, 0] = np.nan
    with pytest.raises(DataError, match="field 'positions'"):
        structure_from_atoms(atoms, source="p.extxyz: frame 0")
    with pytest.raises(DataError, match="field 'positions'"):
        atoms_to_batch(atoms, 5.0)


# --- prediction-time errors ---------------------------------------------------------


@pytest.fixture
def ho_model(make_model):
    return make_model(species=(1, 8), fidelities=("PBE", "MP2"), dtype=torch.float32)


def test_unknown_element_in_model_and_calculator_lists_known_elements(ho_model):
    methane = molecule("CH4")
    with pytest.raises(ValueError, match=r"\['C'\] unknown to this model; it knows \['H', 'O'\]"):
        ho_model(atoms_to_batch(methane, ho_model.cutoff, 0))
    methane.calc = MFCalculator(ho_model, fidelity="PBE")
    with pytest.raises(ValueError, match=r"\['C'\].*\['H', 'O'\]"):
        methane.get_potential_energy()


def test_calculator_requires_a_known_fidelity(ho_model, tmp_path):
    with pytest.raises(ValueError, match=r"fidelity is required.*\['PBE', 'MP2'\]"):
        MFCalculator(ho_model)
    with pytest.raises(ValueError, match=r"unknown fidelity 'CCSD\(T\)'.*\['PBE', 'MP2'\]"):
        MFCalculator(ho_model, fidelity="CCSD(T)")
    save_model(ho_model, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"\['PBE', 'MP2'\]"):
        MFCalculator(tmp_path / "m.pt", fidelity="pbe")
    with pytest.raises(FileNotFoundError):
        MFCalculator(tmp_path / "missing.pt", fidelity="PBE")


@pytest.mark.parametrize("distance", [0.05, 0.0])
def test_calculator_refuses_overlapping_atoms(ho_model, distance):
    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [0.96, 0, distance]])
    atoms.calc = MFCalculator(ho_model, fidelity="MP2")
    with pytest.raises(ValueError, match="closer than min_distance=0.1"):
        atoms.get_potential_energy()
    ok = molecule("H2O")
    ok.calc = MFCalculator(ho_model, fidelity="MP2")
    assert np.isfinite(ok.get_potential_energy())


def test_calculator_refuses_overlap_across_periodic_boundary(make_model):
    model = make_model(species=(14,), dtype=torch.float32)
    atoms = Atoms("Si2", positions=[[0.02, 0, 0], [4.98, 0, 0]], cell=np.eye(3) * 5.0, pbc=True)
    atoms.calc = MFCalculator(model, fidelity="PBE")
    with pytest.raises(ValueError, match=r"closest 0\.040"):
        atoms.get_potential_energy()


# --- configs ---------------------------------------------------------------


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def small_data(tmp_path) -> Path:
    frames = []
    for k in range(12):
        atoms = water(-14.0 + 0.01 * k)
        atoms.rattle(0.02, seed=k)
        frames.append(atoms)
    return write_frames(tmp_path / "water.extxyz", frames)


def base_config(tmp_path, **overrides):
    cfg = {
        "output_dir": str(tmp_path / "out"),
        "data": {"root": str(tmp_path), "files": [{"path": "water.extxyz", "split": {"train": None, "val": 2}}]},
        "model": {"channels": 8, "lmax": 1, "num_layers": 1},
        "training": {"max_epochs": 1},
    }
    cfg.update(overrides)
    return cfg


def test_config_unknown_key_names_file_and_key(tmp_path):
    cfg = base_config(tmp_path)
    cfg["training"]["epochs"] = 5
    path = write_config(tmp_path / "c.yaml", cfg)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "training.epochs: unknown key" in str(err.value)


def test_config_wrong_type_names_key(tmp_path):
    cfg = base_config(tmp_path)
    cfg["training"]["batch_size"] = "many"
    cfg["model"]["lmax"] = 9
    path = write_config(tmp_path / "c.yaml", cfg)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "training.batch_size" in message and "integer" in message
    assert "model.lmax" in message  # every problem is listed


def test_config_missing_file_bad_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_config_rejects_negative_split_size(tmp_path):
    cfg = base_config(tmp_path)
    cfg["data"]["files"][0]["split"]["test"] = -5
    with pytest.raises(ConfigError, match="split.test"):
        load_config(write_config(tmp_path / "c.yaml", cfg))


def test_missing_data_file_names_path_and_how_to_set_the_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MFMLIP_DATA", raising=False)
    cfg = base_config(tmp_path)
    (tmp_path / "empty_root").mkdir()
    cfg["data"]["root"] = str(tmp_path / "empty_root")
    path = write_config(tmp_path / "c.yaml", cfg)
    with pytest.raises(ConfigError) as err:
        train(path)
    message = str(err.value)
    assert str(tmp_path / "empty_root" / "water.extxyz") in message
    assert "--data-root" in message and "MFMLIP_DATA" in message


def test_data_root_that_does_not_exist_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MFMLIP_DATA", str(tmp_path / "nowhere"))
    path = write_config(tmp_path / "c.yaml", base_config(tmp_path))
    with pytest.raises(ConfigError, match=f"data root {tmp_path / 'nowhere'} does not exist"):
        train(path)


def test_resolve_data_root_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MFMLIP_DATA", raising=False)
    cfg = load_config(write_config(tmp_path / "c.yaml", base_config(tmp_path)))
    cfg.data.root = "rel"
    assert resolve_data_root(cfg) == tmp_path / "rel"  # relative to the config file
    monkeypatch.setenv("MFMLIP_DATA", "/env/data")
    assert resolve_data_root(cfg) == Path("/env/data")
    assert resolve_data_root(cfg, "/cli/data") == Path("/cli/data")
    monkeypatch.delenv("MFMLIP_DATA")
    cfg.data.root = None
    cfg.path = Path(__file__).resolve()  # inside the repository: ../shared/data from its root
    assert resolve_data_root(cfg) == Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def test_empty_training_set_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MFMLIP_DATA", raising=False)
    small_data(tmp_path)
    cfg = base_config(tmp_path)
    cfg["data"]["files"][0]["split"] = {"train": 0, "val": 2, "test": None}
    with pytest.raises(DataError, match="empty dataset: no training structures"):
        train(write_config(tmp_path / "c.yaml", cfg))
    cfg["data"]["files"][0]["split"] = {"train": None, "val": 0, "test": 0}
    with pytest.raises(DataError, match="no validation structures"):
        train(write_config(tmp_path / "c.yaml", cfg))
    cfg["data"]["files"][0]["split"] = {"train": 10, "val": 5, "test": 0}
    with pytest.raises(DataError, match="more than the 12 frames"):
        train(write_config(tmp_path / "c.yaml", cfg))


def test_cli_train_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    cfg = base_config(tmp_path)
    cfg["trainig"] = {}
    path = write_config(tmp_path / "c.yaml", cfg)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mfmlip train: error:") and "trainig: unknown key" in err


# --- CLI evaluate ---------------------------------------------------------------


def test_cli_evaluate_unknown_fidelity_exits_2(tmp_path, ho_model):
    model_path = tmp_path / "model.pt"
    save_model(ho_model, model_path)
    data = write_frames(tmp_path / "w.extxyz", [water()])
    result = subprocess.run(
        [sys.executable, "-m", "mfmlip.cli.main", "evaluate", str(model_path), str(data), "--fidelity", "CCSD"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "mfmlip evaluate: error:" in result.stderr
    assert "unknown fidelity 'CCSD'" in result.stderr and "['PBE', 'MP2']" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_evaluate_bad_inputs_exit_2(tmp_path, ho_model, capsys):
    model_path = tmp_path / "model.pt"
    save_model(ho_model, model_path)
    bad = tmp_path / "bad.extxyz"
    bad.write_text("garbage\n")
    assert main(["evaluate", str(model_path), str(bad), "--fidelity", "PBE"]) == 2
    assert f"mfmlip evaluate: error: {bad}" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "none.pt"), str(bad), "--fidelity", "PBE"]) == 2
    assert "not found" in capsys.readouterr().err
    methane = write_frames(tmp_path / "ch4.extxyz", [molecule("CH4")])
    assert main(["evaluate", str(model_path), str(methane), "--fidelity", "PBE"]) == 2
    assert "['C'] unknown to this model" in capsys.readouterr().err
