"""Delta-learning baseline: the model is the sum it claims, survives the model
file, works in the calculator, and its training targets are the residuals."""

import numpy as np
import pytest
import torch

from mfmlip import MFCalculator
from mfmlip.data.structures import structure_from_atoms
from mfmlip.model import DeltaPotential, load_model, save_model
from mfmlip.training.data import subtract_base

from conftest import predict


@pytest.fixture
def delta(make_model):
    base = make_model(fidelities=("PBE", "SCAN"), seed=1, e0=torch.tensor([[-5.0], [-4.0]]))
    correction = make_model(fidelities=("MP2",), seed=2, e0=torch.tensor([[0.3]]))
    return base, correction, DeltaPotential(base, "SCAN", correction)


def test_energy_forces_stress_are_base_at_its_fidelity_plus_correction(delta, si_cell):
    base, correction, model = delta
    total = predict(model, si_cell, 0, stress=True)
    low = predict(base, si_cell, base.fidelity_index("SCAN"), stress=True)
    high = predict(correction, si_cell, 0, stress=True)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(total[key], low[key] + high[key])
    assert model.fidelities == ["MP2"]
    torch.testing.assert_close(model.e0, torch.tensor([[-4.0 + 0.3]], dtype=torch.float64))


def test_delta_model_file_round_trip_and_calculator(delta, si_cell, tmp_path):
    _, _, model = delta
    save_model(model, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt", dtype=torch.float64)
    assert isinstance(loaded, DeltaPotential) and loaded.base_fidelity == "SCAN"
    torch.testing.assert_close(predict(loaded, si_cell)["energy"], predict(model, si_cell)["energy"])
    si_cell.calc = MFCalculator(tmp_path / "model.pt", fidelity="MP2", dtype="float64")
    assert si_cell.get_potential_energy() == pytest.approx(float(predict(model, si_cell)["energy"]), abs=1e-8)
    with pytest.raises(ValueError, match="unknown fidelity 'SCAN'"):
        MFCalculator(tmp_path / "model.pt", fidelity="SCAN")


def test_mismatched_base_is_refused(make_model):
    with pytest.raises(ValueError, match="cutoff"):
        DeltaPotential(make_model(cutoff=4.0), "PBE", make_model(cutoff=5.0))
    with pytest.raises(ValueError, match=r"lacks elements \[8\]"):
        DeltaPotential(make_model(species=(14,)), "PBE", make_model(species=(8, 14)))
    with pytest.raises(ValueError, match="unknown fidelity 'MP2'"):
        DeltaPotential(make_model(), "MP2", make_model())


def test_residual_targets_are_labels_minus_base_predictions(make_model, si_cell):
    base = make_model(fidelities=("PBE",))
    si_cell.info["energy"] = -40.0
    si_cell.arrays["forces"] = np.ones((len(si_cell), 3))
    labelled = structure_from_atoms(si_cell, fidelity="MP2")
    bare = structure_from_atoms(si_cell.copy(), fidelity="MP2")
    bare.forces = None
    residual, no_forces = subtract_base([labelled, bare], base, "PBE")
    low = predict(base, si_cell)
    assert residual.energy == pytest.approx(-40.0 - float(low["energy"]))
    np.testing.assert_allclose(residual.forces, 1.0 - low["forces"].numpy())
    assert no_forces.forces is None  # a missing label stays missing
    assert labelled.energy == -40.0  # the input is not modified
