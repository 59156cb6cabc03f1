"""The torch-sim model (mfmlip.simulation.torchsim): batched results equal the ASE calculator's."""

import numpy as np
import pytest
import torch
from ase.build import bulk

from conftest import rattled_si
from mfmlip import MFCalculator

import torch_sim as ts  # the optional extra mfmlip[torchsim]; the test extra installs it
from mfmlip.simulation.torchsim import MFTorchSimModel


def two_systems():
    """Different sizes, cells and compositions: a rattled triclinic Si cell (4 atoms)
    and a strained, rattled cubic SiGe cell (8 atoms)."""
    sige = bulk("Si", "diamond", a=5.55, cubic=True)
    sige.symbols[[1, 6]] = "Ge"
    sige.set_cell(sige.cell.array @ np.array([[1.02, 0.03, 0.0], [0.0, 0.99, 0.01], [0.0, 0.0, 1.0]]),
                  scale_atoms=True)
    sige.rattle(0.05, seed=11)
    return [rattled_si(), sige]


def test_batch_of_two_systems_equals_single_system_calculator(make_model):
    model = make_model(species=(14, 32))
    systems = two_systems()
    ts_model = MFTorchSimModel(model, fidelity="SCAN")
    state = ts.io.atoms_to_state(systems, torch.device("cpu"), torch.float64)
    assert state.n_systems == 2
    out = ts_model(state)
    assert out["energy"].shape == (2,) and out["forces"].shape == (12, 3) and out["stress"].shape == (2, 3, 3)

    calc = MFCalculator(model, fidelity="SCAN")
    start = 0
    for b, atoms in enumerate(systems):
        atoms = atoms.copy()
        atoms.calc = calc
        n = len(atoms)
        assert float(out["energy"][b]) == pytest.approx(atoms.get_potential_energy(), rel=1e-10, abs=1e-10)
        np.testing.assert_allclose(out["forces"][start:start + n].numpy(), atoms.get_forces(), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(out["stress"][b].numpy(), atoms.get_stress(voigt=False), rtol=1e-8, atol=1e-12)
        start += n
    # the fidelity is the chosen one: the other level gives other energies
    other = MFTorchSimModel(model, fidelity="PBE")(state)
    assert not torch.allclose(other["energy"], out["energy"])


def test_conforms_to_torch_sim_model_interface(make_model):
    from torch_sim.models.interface import validate_model_outputs

    model = MFTorchSimModel(make_model(species=(14, 26)), fidelity="PBE", compute_stress=False)
    validate_model_outputs(model, torch.device("cpu"), torch.float64)  # raises on any mismatch
    assert model.compute_stress  # the validator switched stress on through the setter


def test_relax_and_md_of_two_systems_in_one_batch(make_model):
    model = MFTorchSimModel(make_model(species=(14, 32)), fidelity="SCAN")
    systems = two_systems()
    before = model(ts.io.atoms_to_state(systems, model.device, model.dtype))["energy"]
    relaxed = ts.optimize(systems, model, optimizer=ts.frechet_cell_fire, max_steps=30,
                          convergence_fn=ts.generate_force_convergence_fn(force_tol=1e-3))
    after = model(relaxed)["energy"]
    assert relaxed.n_systems == 2 and bool((after < before).all())

    final = ts.integrate(systems, model, integrator=ts.nvt_langevin, n_steps=5, temperature=300.0,
                         timestep=0.001, seed=1)
    assert final.n_systems == 2 and torch.isfinite(final.positions).all()
    assert not torch.allclose(final.positions, ts.io.atoms_to_state(systems, model.device, model.dtype).positions)


def test_fidelity_is_required(make_model):
    with pytest.raises(ValueError, match=r"fidelity is required; this model has \['PBE', 'SCAN'\]"):
        MFTorchSimModel(make_model())
    with pytest.raises(ValueError, match="unknown fidelity 'MP2'"):
        MFTorchSimModel(make_model(), fidelity="MP2")


def test_state_dict_input_and_molecule_without_stress(make_model):
    model = make_model(species=(14, 32))
    systems = two_systems()
    state = ts.io.atoms_to_state(systems, torch.device("cpu"), torch.float64)
    ts_model = MFTorchSimModel(model, fidelity="SCAN")
    as_dict = {"positions": state.positions, "cell": state.cell, "atomic_numbers": state.atomic_numbers,
               "system_idx": state.system_idx}
    torch.testing.assert_close(ts_model(as_dict)["energy"], ts_model(state)["energy"])

    cluster = systems[1].copy()
    cluster.pbc = False
    cluster.center(vacuum=5.0)
    free = ts.io.atoms_to_state([cluster], torch.device("cpu"), torch.float64)
    with pytest.raises(ValueError, match="stress needs 3D-periodic systems"):
        ts_model(free)
    out = MFTorchSimModel(model, fidelity="SCAN", compute_stress=False)(free)
    cluster.calc = MFCalculator(model, fidelity="SCAN")
    assert "stress" not in out and float(out["energy"][0]) == pytest.approx(cluster.get_potential_energy(), abs=1e-10)
