"""SevenNet networks behind mfmlip's potential interface (the ``sevenn`` extra)."""

import sys

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from mfmlip.cli.main import main
from mfmlip.data.graph import atoms_to_batch, collate
from mfmlip.model import ModelFileError, SevenNetPotential, load_model, save_model, validate_potential
from mfmlip.model.extend import add_fidelity
from mfmlip.simulation.calculator import MFCalculator

from conftest import rattled_si

import sevenn.calculator as sevenn_calculator  # the sevenn extra is part of [test]
MF0 = "sevenn:7net-mf-0"


def srtio3():
    """Cubic perovskite SrTiO3 doubled along c and rattled: a three-element crystal."""
    a = 3.905
    atoms = Atoms("SrTiO3", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5],
                                              [0, 0.5, 0.5]], cell=[a, a, a], pbc=True) * (1, 1, 2)
    atoms.rattle(0.05, seed=7)
    return atoms


def ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=5)
    return atoms


STRUCTURES = {"triclinic Si": rattled_si, "ethanol molecule": ethanol, "SrTiO3 crystal": srtio3}


@pytest.fixture(scope="module")
def mf0():
    return load_model(MF0)


@pytest.fixture(scope="module")
def sevennet():
    """SevenNet's own calculator of ``(model, modal)``, built once per module."""
    built = {}

    def get(model: str, modal: str | None = None):
        if (model, modal) not in built:
            built[model, modal] = sevenn_calculator.SevenNetCalculator(model, modal=modal, device="cpu")
        return built[model, modal]

    return get


@pytest.mark.parametrize("fidelity", ["PBE", "R2SCAN"])
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_predictions_equal_sevennet_calculator(mf0, sevennet, name, fidelity):
    ours, theirs = STRUCTURES[name](), STRUCTURES[name]()
    ours.calc = MFCalculator(mf0, fidelity=fidelity)
    theirs.calc = sevennet("7net-mf-0", fidelity)
    n = len(ours)
    assert abs(ours.get_potential_energy() - theirs.get_potential_energy()) / n < 1e-5  # eV/atom
    np.testing.assert_allclose(ours.get_forces(), theirs.get_forces(), atol=1e-4)  # eV/A
    if ours.pbc.all():
        np.testing.assert_allclose(ours.get_stress(), theirs.get_stress(), atol=1e-5)  # eV/A^3


def test_the_fidelities_differ_and_the_name_loads_through_the_calculator():
    atoms = srtio3()
    calc = MFCalculator(MF0, fidelity="R2SCAN")
    atoms.calc = calc
    r2scan = atoms.get_potential_energy()
    calc.set(fidelity="PBE")
    assert calc.model.fidelities == ["R2SCAN", "PBE"] and calc.model.cutoff == 5.0
    assert abs(atoms.get_potential_energy() - r2scan) > 0.1  # the one-hot changes the prediction


def test_sevennet_potential_keeps_the_potential_contract(mf0):
    model = SevenNetPotential(mf0.config, mf0.net.state_dict()).double()
    batch = collate([atoms_to_batch(rattled_si(), model.cutoff, 0), atoms_to_batch(ethanol(), model.cutoff, 1)])
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    validate_potential(model, batch)


def test_an_added_fidelity_starts_as_its_copy_and_survives_the_model_file(mf0, tmp_path):
    grown = add_fidelity(mf0, "MP2", like="R2SCAN").eval()
    assert grown.fidelities == ["R2SCAN", "PBE", "MP2"]
    path = tmp_path / "model.pt"
    save_model(grown, path)
    loaded = load_model(path)
    atoms = srtio3()
    energies = {}
    for label, model in (("before", mf0), ("grown", grown), ("loaded", loaded)):
        for fidelity in model.fidelities:
            atoms.calc = MFCalculator(model, fidelity=fidelity)
            energies[label, fidelity] = atoms.get_potential_energy()
    for fidelity in ("R2SCAN", "PBE"):
        assert energies["grown", fidelity] == pytest.approx(energies["before", fidelity], abs=1e-4)
    assert energies["grown", "MP2"] == pytest.approx(energies["before", "R2SCAN"], abs=1e-4)
    assert energies["loaded", "MP2"] == pytest.approx(energies["grown", "MP2"], abs=1e-6)


def test_a_model_without_fidelity_input_loads_but_refuses_new_fidelities(sevennet):
    model = load_model("sevenn:7net-0")
    assert model.fidelities == ["PBE"]
    atoms, theirs = srtio3(), srtio3()
    atoms.calc = MFCalculator(model, fidelity="PBE")
    theirs.calc = sevennet("7net-0")
    assert abs(atoms.get_potential_energy() - theirs.get_potential_energy()) / len(atoms) < 1e-5
    with pytest.raises(ValueError, match="no fidelity input"):
        add_fidelity(model, "MP2", like="PBE")


def test_info_and_evaluate_take_a_sevenn_name(sevennet, tmp_path, capsys):
    frames = []
    for atoms in (srtio3(), ethanol()):
        atoms.calc = sevennet("7net-mf-0", "R2SCAN")
        atoms.info["energy"], atoms.arrays["forces"] = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = None
        frames.append(atoms)
    import ase.io

    data = tmp_path / "labelled.extxyz"
    ase.io.write(data, frames)
    assert main(["info", MF0]) == 0
    out = capsys.readouterr().out
    assert "'R2SCAN'" in out and "'PBE'" in out and "cutoff 5.0 A" in out
    assert main(["evaluate", MF0, str(data), "--fidelity", "R2SCAN", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    forces_mae = float(next(line for line in out.splitlines() if " forces " in f" {line} ").split()[2])
    assert forces_mae < 0.1  # meV/A: the labels are the model's own


def test_unknown_name_lists_the_shipped_models():
    with pytest.raises(ValueError, match="sevenn:7net-mf-0"):
        load_model("sevenn:7net-nonexistent")


def test_without_the_extra_a_sevenn_name_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "sevenn" or m.startswith("sevenn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sevenn", None)  # import sevenn -> ImportError
    with pytest.raises(ModelFileError, match=r'pip install "mfmlip\[sevenn\]"'):
        load_model(MF0)
    assert main(["info", MF0]) == 2
