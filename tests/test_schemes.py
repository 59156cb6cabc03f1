import numpy as np
import pytest
import torch
from e3nn import o3

from conftest import predict
from mfmlip.model.fidelity import SCHEMES

SCHEME_NAMES = sorted(SCHEMES)


def _model(make_model, scheme):
    options = {"dim": 4} if "dim" in SCHEMES[scheme].OPTIONS else {}
    model = make_model(species=(14,), fidelity_scheme=scheme, e0=[[-5.0], [-5.0]],
                       **{f"fidelity_{k}": v for k, v in options.items()})
    with torch.no_grad():  # make the fidelity parameters non-trivial
        for p in model.fidelity.parameters():
            p.normal_()
    return model


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_switching_fidelity_changes_energy_and_forces(make_model, si_cell, scheme):
    model = _model(make_model, scheme)
    a, b = predict(model, si_cell, 0), predict(model, si_cell, 1)
    assert abs(float(a["energy"] - b["energy"])) > 1e-4
    assert not torch.allclose(a["forces"], b["forces"])


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_each_scheme_is_rotation_invariant(make_model, si_cell, scheme):
    model = _model(make_model, scheme)
    torch.manual_seed(1)
    R = o3.rand_matrix(dtype=torch.float64).numpy()
    rotated = si_cell.copy()
    rotated.set_cell(si_cell.cell.array @ R.T, scale_atoms=False)
    rotated.positions = si_cell.positions @ R.T
    for fid in (0, 1):
        a, b = predict(model, si_cell, fid, stress=True), predict(model, rotated, fid, stress=True)
        assert float(a["energy"]) == pytest.approx(float(b["energy"]), abs=1e-9)
        np.testing.assert_allclose(b["forces"].numpy(), a["forces"].numpy() @ R.T, atol=1e-9)
        np.testing.assert_allclose(b["stress"][0].numpy(), R @ a["stress"][0].numpy() @ R.T, atol=1e-9)


@pytest.mark.parametrize("scheme, backbone_sees_fidelity",
                         [("heads", False), ("one_hot_linear", True), ("state_embedding", True)])
def test_where_the_fidelity_enters(make_model, si_cell, scheme, backbone_sees_fidelity):
    # heads: shared backbone features, fidelity only in the readout output;
    # the other two feed the fidelity into the backbone's linear layers
    model = _model(make_model, scheme)
    a, b = predict(model, si_cell, 0), predict(model, si_cell, 1)
    same = torch.allclose(a["node_features"], b["node_features"])
    assert same != backbone_sees_fidelity
    assert model.fidelity.n_heads == (2 if scheme == "heads" else 1)


def test_state_embedding_has_one_vector_per_fidelity(make_model):
    model = make_model(species=(14,), fidelity_scheme="state_embedding", fidelity_dim=4)
    assert model.fidelity.embedding.weight.shape == (2, 4)
    # the state is appended to the scalar inputs at every site: pre, post, readout
    assert model.blocks[0].linear_pre.irreps_in.count("0e") == 8 + 4
    assert model.readout.mlp[0].in_features == 8 + 4


def test_unknown_scheme_is_refused(make_model):
    with pytest.raises(ValueError, match="unknown fidelity scheme 'bogus'"):
        make_model(species=(14,), fidelity_scheme="bogus")


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_added_fidelity_starts_as_a_copy_and_can_be_fine_tuned(make_model, si_cell, scheme):
    from mfmlip.model.extend import add_fidelity

    model = _model(make_model, scheme)
    bigger = add_fidelity(model, "MP2", like="SCAN")
    assert bigger.fidelities == ["PBE", "SCAN", "MP2"]
    for fid in (0, 1):  # old fidelities unchanged
        torch.testing.assert_close(predict(bigger, si_cell, fid)["energy"], predict(model, si_cell, fid)["energy"])
    new, like = predict(bigger, si_cell, 2), predict(model, si_cell, 1)
    torch.testing.assert_close(new["energy"], like["energy"])
    torch.testing.assert_close(new["forces"], like["forces"])
    # fine-tuning on the new fidelity only moves its predictions away from SCAN's
    target = float(like["energy"]) + 0.5
    opt = torch.optim.Adam(bigger.parameters(), lr=1e-2)
    from conftest import atoms_to_batch

    batch = atoms_to_batch(si_cell, bigger.cutoff, 2)
    for _ in range(30):
        loss = (bigger(batch, compute_forces=False)["energy"][0] - target) ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(float(predict(bigger, si_cell, 2)["energy"]) - target) < 0.1


def test_adding_an_existing_fidelity_is_refused(make_model):
    from mfmlip.model.extend import add_fidelity

    with pytest.raises(ValueError, match="exists already"):
        add_fidelity(make_model(species=(14,)), "PBE")
