"""Bad input gives a clear error naming the file, frame and field (or, for
configs, the key), or is handled where it is legitimate (isolated atoms, small
or partly periodic cells); never a crash or a NaN deep in torch.

Complements ``test_errors.py`` (which has the basic cases: missing file, frame
without fidelity, wrong-shaped label in ``info``, NaN energy, unknown
element/fidelity in the calculator, config keys and types).
"""

import re
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from conftest import predict
from test_errors import base_config, write_config
from tiny_runs import labelled_water, tiny_config, write_water

from mfmlip import MFCalculator
from mfmlip.analysis.evaluate import evaluate
from mfmlip.cli.main import main
from mfmlip.data import DataError, atoms_to_batch, collate, read_structures, structure_from_atoms, structure_to_graph
from mfmlip.training.config import ConfigError, load_config
from mfmlip.training.loss import MaskedLoss
from mfmlip.training.run import read_metrics, train

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
    pytest.mark.filterwarnings("ignore:Experiment logs directory"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory"),
]


@pytest.fixture(autouse=True)
def _data_root_from_the_config(monkeypatch):
    """The tiny runs give ``data.root``; MFMLIP_DATA (the reference data) would take precedence."""
    monkeypatch.delenv("MFMLIP_DATA", raising=False)


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
    from mfmlip.model import MFPotential

    torch.manual_seed(0)
    return MFPotential(list(species), ["PBE"], cutoff=4.0, channels=8, lmax=1, num_layers=2,
                       avg_num_neighbors=10.0).double().eval()


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
