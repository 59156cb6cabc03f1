import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase import Atoms
from ase.build import molecule

from mfmlip import MFCalculator
from mfmlip.cli.main import main
from mfmlip.data import DataError, atoms_to_batch, read_structures, structure_from_atoms
from mfmlip.model import save_model
from mfmlip.training.config import ConfigError, load_config, resolve_data_root
from mfmlip.training.run import train


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
