import numpy as np
import pytest
import torch

from mfmlip.data import collate, read_structures, structure_to_graph, to_device
from mfmlip.training.loss import MaskedLoss

# two graphs: graph 0 (fidelity 0, 2 atoms), graph 1 (fidelity 1, 3 atoms)
N_ATOMS = torch.tensor([2, 3])


def make_batch(energy_mask=(True, True), forces_mask=(True,) * 5, stress_mask=(False, False)):
    return {
        "fidelity": torch.tensor([0, 1]),
        "n_atoms": N_ATOMS.clone(),
        "batch": torch.tensor([0, 0, 1, 1, 1]),
        "energy": torch.tensor([1.0, 2.0], dtype=torch.float64),
        "energy_mask": torch.tensor(energy_mask),
        "forces": torch.zeros(5, 3, dtype=torch.float64),
        "forces_mask": torch.tensor(forces_mask),
        "stress": torch.zeros(2, 3, 3, dtype=torch.float64),
        "stress_mask": torch.tensor(stress_mask),
    }


def make_pred():
    forces = torch.arange(15, dtype=torch.float64).reshape(5, 3) / 100.0
    return {
        "energy": torch.tensor([1.2, 2.6], dtype=torch.float64, requires_grad=True),
        "forces": forces.requires_grad_(True),
        "stress": torch.full((2, 3, 3), 0.01, dtype=torch.float64, requires_grad=True),
    }


ONES = torch.ones(2, 3)


def test_mse_values_by_hand():
    loss, parts = MaskedLoss(ONES)(make_pred(), make_batch())
    # per-atom energy errors 0.2/2 and 0.6/3
    assert float(parts["energy"]) == pytest.approx((0.1**2 + 0.2**2) / 2, rel=1e-12)
    f = np.arange(15) / 100.0
    assert float(parts["forces"]) == pytest.approx(np.mean(f**2), rel=1e-12)
    assert float(parts["stress"]) == 0.0  # no stress labels at all: finite, zero
    assert float(loss) == pytest.approx(float(parts["energy"] + parts["forces"]), rel=1e-12)


def test_masked_energy_label_is_ignored_whatever_its_value():
    lf = MaskedLoss(ONES)
    batch = make_batch(energy_mask=(True, False))
    pred = make_pred()
    _, parts = lf(pred, batch)
    assert float(parts["energy"]) == pytest.approx(0.1**2, rel=1e-12)  # mean over labelled only
    batch["energy"][1] = 12345.0
    _, parts2 = lf(make_pred(), batch)
    assert float(parts2["energy"]) == float(parts["energy"])
    parts["energy"].backward()
    assert pred["energy"].grad[1] == 0.0 and pred["energy"].grad[0] != 0.0


def test_masked_forces_of_one_structure_are_ignored():
    lf = MaskedLoss(ONES)
    batch = make_batch(forces_mask=(True, True, False, False, False))
    batch["forces"][2:] = 99.0  # junk where there is no label
    pred = make_pred()
    _, parts = lf(pred, batch)
    f = np.arange(15).reshape(5, 3)[:2] / 100.0
    assert float(parts["forces"]) == pytest.approx(np.mean(f**2), rel=1e-12)
    parts["forces"].backward()
    assert torch.all(pred["forces"].grad[2:] == 0) and torch.all(torch.isfinite(pred["forces"].grad))


@pytest.mark.parametrize("field", ["energy", "forces"])
def test_masked_nan_label_does_not_poison_loss_or_gradients(field):
    lf = MaskedLoss(ONES)
    batch = make_batch(energy_mask=(True, False), forces_mask=(True, True, False, False, False))
    reference, _ = lf(make_pred(), batch)
    if field == "energy":
        batch["energy"][1] = float("nan")
    else:
        batch["forces"][3] = float("nan")
    pred = make_pred()
    loss, _ = lf(pred, batch)
    loss.backward()
    assert torch.isfinite(loss) and float(loss) == pytest.approx(float(reference), rel=1e-12)
    assert all(torch.all(torch.isfinite(pred[k].grad)) for k in ("energy", "forces"))


def test_absent_labels_from_real_data_give_finite_loss_and_gradients(data_file, make_model):
    # CCSD(T) frames have no forces: zero-filled and masked by the graph builder
    structures = read_structures(data_file("malonaldehyde/CCSDT_CBS.extxyz"), index="0:4")
    model = make_model(species=(1, 6, 8), fidelities=("GFN2-xTB", "CCSD(T)/CBS"), dtype=torch.float32)
    model.train()
    batch = to_device(collate([structure_to_graph(s, model.cutoff, 1) for s in structures]), "cpu", torch.float32)
    lf = MaskedLoss(torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))
    loss, parts = lf(model(batch), batch)
    assert float(parts["forces"]) == 0.0 and float(parts["energy"]) > 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.all(torch.isfinite(g)) for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_zero_weight_removes_a_fidelity_and_weights_scale_terms():
    batch, pred = make_batch(), make_pred()
    only_f0 = MaskedLoss(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    _, parts = only_f0(pred, batch)
    # fidelity 1 neither adds error nor counts in the mean
    assert float(parts["energy"]) == pytest.approx(0.1**2, rel=1e-12)
    batch["energy"][1] = -500.0
    assert float(only_f0(make_pred(), batch)[1]["energy"]) == float(parts["energy"])

    doubled = MaskedLoss(torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    assert float(doubled(make_pred(), make_batch())[1]["energy"]) == pytest.approx(2 * 0.1**2, rel=1e-12)

    no_forces_f1 = MaskedLoss(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    f = np.arange(15).reshape(5, 3)[:2] / 100.0  # atoms of graph 0 only
    assert float(no_forces_f1(make_pred(), make_batch())[1]["forces"]) == pytest.approx(np.mean(f**2), rel=1e-12)


def test_needs_forces_and_stress_follow_weights():
    assert MaskedLoss(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])).needs_forces is False
    lf = MaskedLoss(torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0]]))
    assert lf.needs_forces and not lf.needs_stress
    pred = make_pred()
    pred.pop("stress")
    _, parts = MaskedLoss(torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))(pred, make_batch())
    assert set(parts) == {"energy", "forces"}


def test_stress_term_uses_stress_mask():
    lf = MaskedLoss(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    _, parts = lf(make_pred(), make_batch(stress_mask=(False, True)))
    assert float(parts["stress"]) == pytest.approx(0.01**2, rel=1e-12)


def test_huber_is_half_mse_for_small_errors_and_linear_for_large():
    delta = 0.5
    mse, huber = MaskedLoss(ONES, "mse"), MaskedLoss(ONES, "huber", huber_delta=delta)
    # small errors (all below delta): Huber = err^2 / 2
    small_mse = mse(make_pred(), make_batch())[1]
    small_hub = huber(make_pred(), make_batch())[1]
    for k in ("energy", "forces"):
        assert float(small_hub[k]) == pytest.approx(0.5 * float(small_mse[k]), rel=1e-12)
    # one large force error: Huber grows linearly, delta * (|e| - delta/2), far below e^2
    batch = make_batch(forces_mask=(True, False, False, False, False))
    pred = make_pred()
    with torch.no_grad():
        pred["forces"].zero_()
        pred["forces"][0, 0] = 10.0
    e_mse = float(mse(pred, batch)[1]["forces"])
    _, parts = huber(pred, batch)
    assert e_mse == pytest.approx(100.0 / 3)
    assert float(parts["forces"]) == pytest.approx(delta * (10.0 - delta / 2) / 3, rel=1e-12)
    parts["forces"].backward()
    assert float(pred["forces"].grad[0, 0]) == pytest.approx(delta / 3, rel=1e-12)  # bounded gradient
