import numpy as np
import pytest
import torch
from ase.calculators.calculator import PropertyNotImplementedError
from ase.stress import full_3x3_to_voigt_6_stress
from e3nn import o3

from mfmlip import MFCalculator
from mfmlip.model import ModelFileError, load_model, save_model
from mfmlip.data.graph import atoms_to_batch

from conftest import predict, rattled_si

ETHANOL_SPECIES = (1, 6, 8)


def random_orthogonal(seed: int, reflect: bool) -> np.ndarray:
    torch.manual_seed(seed)
    R = o3.rand_matrix(dtype=torch.float64).numpy()  # float64: orthogonal to ~1e-16
    assert np.allclose(R @ R.T, np.eye(3), rtol=0, atol=1e-14)
    if reflect:  # improper rotation: proper rotation times a mirror, det = -1
        R = R @ np.diag([1.0, 1.0, -1.0])
    return R


def transformed(atoms, R):
    new = atoms.copy()
    new.set_cell(atoms.cell.array @ R.T, scale_atoms=False)
    new.positions = atoms.positions @ R.T
    return new


@pytest.fixture(params=["si", "ethanol"])
def system(request, make_model, si_cell, ethanol):
    if request.param == "si":
        return make_model(species=(14,)), si_cell
    return make_model(species=ETHANOL_SPECIES), ethanol


@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "rotoreflection"])
def test_energy_invariant_forces_and_stress_equivariant_under_orthogonal_maps(system, reflect):
    model, atoms = system
    R = random_orthogonal(seed=11, reflect=reflect)
    assert np.isclose(np.linalg.det(R), -1.0 if reflect else 1.0)
    periodic = bool(atoms.pbc.all())
    ref = predict(model, atoms, stress=periodic)
    rot = predict(model, transformed(atoms, R), stress=periodic)
    assert ref["forces"].abs().max() > 1e-4  # not a trivially zero field
    torch.testing.assert_close(rot["energy"], ref["energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(rot["forces"], ref["forces"] @ torch.as_tensor(R).T, rtol=0, atol=1e-10)
    if periodic:
        assert ref["stress"].abs().max() > 1e-6
        Rt = torch.as_tensor(R)
        # stress is a rank-2 tensor: sigma' = R sigma R^T
        torch.testing.assert_close(rot["stress"][0], Rt @ ref["stress"][0] @ Rt.T, rtol=0, atol=1e-10)


def test_translation_invariance(system):
    model, atoms = system
    ref = predict(model, atoms, stress=True)
    moved = atoms.copy()
    moved.translate([1.37, -2.11, 0.73])
    if moved.pbc.all():
        moved.wrap()  # atoms change image: exercises the cell shifts
        assert not np.allclose(moved.get_scaled_positions(wrap=False), atoms.get_scaled_positions(wrap=False))
    out = predict(model, moved, stress=True)
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out["forces"], ref["forces"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out["stress"], ref["stress"], rtol=0, atol=1e-10)


def test_permutation_invariance(system):
    model, atoms = system
    perm = np.random.default_rng(2).permutation(len(atoms))
    assert (perm != np.arange(len(atoms))).any()
    ref = predict(model, atoms, stress=True)
    out = predict(model, atoms[perm], stress=True)
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out["forces"], ref["forces"][perm], rtol=0, atol=1e-10)
    torch.testing.assert_close(out["atomic_energy"], ref["atomic_energy"][perm], rtol=0, atol=1e-10)
    torch.testing.assert_close(out["stress"], ref["stress"], rtol=0, atol=1e-10)


def _energy(model, atoms, fidelity=0) -> float:
    batch = atoms_to_batch(atoms, model.cutoff, fidelity)
    return float(model(batch, compute_forces=False)["energy"].item())


def _fd_forces(model, atoms, fidelity=0, h=1e-5):
    """Central finite differences of the energy, -dE/dr, shape (n_atoms, 3)."""
    numeric = np.zeros((len(atoms), 3))
    for a in range(len(atoms)):
        for k in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[a, k] += h
            minus.positions[a, k] -= h
            numeric[a, k] = -(_energy(model, plus, fidelity) - _energy(model, minus, fidelity)) / (2 * h)
    return numeric


@pytest.mark.parametrize("fidelity", [0, 1])
def test_forces_equal_finite_differences_periodic_triclinic(make_model, si_cell, fidelity):
    model = make_model(species=(14,))
    analytic = predict(model, si_cell, fidelity)["forces"].numpy()
    numeric = _fd_forces(model, si_cell, fidelity)
    assert np.abs(analytic).max() > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=0, atol=1e-7)


def test_forces_equal_finite_differences_molecule(make_model, ethanol):
    model = make_model(species=ETHANOL_SPECIES)
    analytic = predict(model, ethanol)["forces"].numpy()
    numeric = _fd_forces(model, ethanol)
    np.testing.assert_allclose(analytic, numeric, rtol=0, atol=1e-7)


def test_stress_equals_finite_difference_of_symmetric_strain(make_model, si_cell):
    model = make_model(species=(14,))
    h = 1e-5
    volume = si_cell.get_volume()
    analytic = predict(model, si_cell, stress=True)["stress"][0].numpy()
    numeric = np.zeros((3, 3))
    for a in range(3):
        for b in range(a, 3):
            # symmetric strain with eps_ab = eps_ba = h/2 (eps_aa = h): dE = V sigma_ab h
            eps = np.zeros((3, 3))
            eps[a, b] += h / 2
            eps[b, a] += h / 2
            energies = []
            for sign in (1, -1):
                strained = si_cell.copy()
                deform = np.eye(3) + sign * eps
                strained.set_cell(si_cell.cell.array @ deform, scale_atoms=False)
                strained.positions = si_cell.positions @ deform
                energies.append(_energy(model, strained))
            numeric[a, b] = numeric[b, a] = (energies[0] - energies[1]) / (2 * h) / volume
    assert np.abs(analytic).max() > 1e-5
    np.testing.assert_allclose(analytic, analytic.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(analytic, numeric, rtol=0, atol=1e-8)


def test_calculator_matches_model_and_gives_voigt_stress_for_periodic_cell(make_model, si_cell):
    model = make_model(species=(14,))
    ref = predict(model, si_cell, stress=True)
    atoms = si_cell.copy()
    atoms.calc = MFCalculator(model, fidelity="SCAN", dtype="float64")
    ref_scan = predict(model, si_cell, fidelity=1, stress=True)
    assert atoms.get_potential_energy() == pytest.approx(float(ref_scan["energy"]), abs=1e-10)
    assert atoms.get_potential_energy() != pytest.approx(float(ref["energy"]), abs=1e-6)
    np.testing.assert_allclose(atoms.get_forces(), ref_scan["forces"].numpy(), atol=1e-10)
    stress = atoms.get_stress()
    assert stress.shape == (6,)
    np.testing.assert_allclose(stress, full_3x3_to_voigt_6_stress(ref_scan["stress"][0].numpy()), atol=1e-12)
    assert atoms.calc.results["free_energy"] == atoms.calc.results["energy"]


def test_switching_fidelity_changes_energy_and_forces(make_model, ethanol):
    model = make_model(species=ETHANOL_SPECIES, fidelities=("lo", "hi"))
    lo, hi = predict(model, ethanol, 0), predict(model, ethanol, 1)
    assert abs(float(lo["energy"] - hi["energy"])) > 1e-4
    assert (lo["forces"] - hi["forces"]).abs().max() > 1e-5
    # the same fidelity twice is deterministic
    torch.testing.assert_close(predict(model, ethanol, 1)["energy"], hi["energy"], rtol=0, atol=0)


def test_batched_prediction_equals_single_structures(make_model, ethanol):
    model = make_model(species=(1, 6, 8, 14))
    si = rattled_si()
    b1, b2 = atoms_to_batch(ethanol, model.cutoff, 1), atoms_to_batch(si, model.cutoff, 0)
    joint = model(_merge(b1, b2), compute_stress=True)
    e1 = predict(model, ethanol, 1, stress=True)
    e2 = predict(model, si, 0, stress=True)
    torch.testing.assert_close(joint["energy"].detach(), torch.cat([e1["energy"], e2["energy"]]), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        joint["forces"].detach(), torch.cat([e1["forces"], e2["forces"]]), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(joint["stress"].detach()[1], e2["stress"][0], rtol=0, atol=1e-10)
    assert torch.all(joint["stress"].detach()[0] == 0)


def _merge(*batches):
    # atoms_to_batch returns collated one-graph batches; re-collate them as graphs
    from mfmlip.data.graph import collate

    graphs = [{k: v for k, v in b.items() if k != "batch"} for b in batches]
    return collate(graphs)


def test_non_periodic_structure_has_zero_stress_and_calculator_gives_none(make_model, ethanol):
    model = make_model(species=ETHANOL_SPECIES)
    out = predict(model, ethanol, stress=True)
    assert out["stress"].shape == (1, 3, 3)
    assert torch.all(out["stress"] == 0)
    atoms = ethanol.copy()
    atoms.calc = MFCalculator(model, fidelity="PBE", dtype="float64")
    atoms.get_potential_energy()
    assert "stress" not in atoms.calc.results
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


E0_TABLE = [[-13.5, -1029.25, -2041.875], [-0.5, -1.25, -2.75]]  # exactly representable in float32


@pytest.mark.parametrize("fidelity", [0, 1])
def test_e0_is_added_inside_forward(make_model, ethanol, fidelity):
    bare = make_model(species=ETHANOL_SPECIES, seed=4)
    with_e0 = make_model(species=ETHANOL_SPECIES, seed=4, e0=E0_TABLE)
    z_col = {1: 0, 6: 1, 8: 2}
    per_atom = np.array([E0_TABLE[fidelity][z_col[z]] for z in ethanol.numbers])
    a, b = predict(bare, ethanol, fidelity), predict(with_e0, ethanol, fidelity)
    assert float(b["energy"] - a["energy"]) == pytest.approx(per_atom.sum(), abs=1e-9)
    np.testing.assert_allclose((b["atomic_energy"] - a["atomic_energy"]).numpy(), per_atom, atol=1e-9)
    torch.testing.assert_close(b["forces"], a["forces"], rtol=0, atol=1e-12)  # a constant shift
    np.testing.assert_array_equal(with_e0.e0_table(), np.array(E0_TABLE))


def test_e0_keeps_float64_precision_in_float64_model(make_model, ethanol):
    table = [[-13.605693122994, -1029.8624713001, -2041.9276654327]]
    bare = make_model(species=ETHANOL_SPECIES, fidelities=("PBE",), seed=4)
    with_e0 = make_model(species=ETHANOL_SPECIES, fidelities=("PBE",), seed=4, e0=table)
    z_col = {1: 0, 6: 1, 8: 2}
    expected = sum(table[0][z_col[z]] for z in ethanol.numbers)
    diff = float(predict(with_e0, ethanol)["energy"] - predict(bare, ethanol)["energy"])
    assert diff == pytest.approx(expected, abs=1e-9)


def test_save_load_round_trip_gives_identical_predictions(make_model, si_cell, tmp_path):
    model = make_model(species=(14,), dtype=torch.float32, e0=[[-5.25], [-4.5]], energy_scale=0.7)
    path = tmp_path / "sub" / "model.pt"
    save_model(model, path, metadata={"note": "round trip"})
    loaded = load_model(path)
    assert loaded.fidelities == model.fidelities and loaded.species == model.species
    assert loaded.cutoff == model.cutoff and not loaded.training
    assert loaded.metadata == {"note": "round trip"}
    for fid in (0, 1):
        a, b = predict(model, si_cell, fid, stress=True), predict(loaded, si_cell, fid, stress=True)
        for key in ("energy", "forces", "stress"):
            assert torch.equal(a[key], b[key]), key
    # and through the calculator, from the file
    atoms = si_cell.copy()
    atoms.calc = MFCalculator(path, fidelity="SCAN")
    assert atoms.get_potential_energy() == pytest.approx(float(predict(model, si_cell, 1)["energy"]), abs=1e-5)


def test_save_load_round_trip_of_float64_model_keeps_precision(make_model, si_cell, tmp_path):
    model = make_model(species=(14,))
    with torch.no_grad():  # weights as after float64 training: not representable in float32
        for p in model.parameters():
            p.add_(1e-9 * torch.randn_like(p))
    save_model(model, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt", dtype=torch.float64)
    a, b = predict(model, si_cell, stress=True), predict(loaded, si_cell, stress=True)
    torch.testing.assert_close(b["energy"], a["energy"], rtol=0, atol=1e-12)
    torch.testing.assert_close(b["forces"], a["forces"], rtol=0, atol=1e-12)


def _damage(path, tmp_path, how: str):
    """A copy of the model file at ``path``, damaged in one of the ways users meet."""
    bad = tmp_path / f"{how}.pt"
    raw = path.read_bytes()
    data = torch.load(path, weights_only=False)
    if how == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif how == "random":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "empty":
        bad.write_bytes(b"")
    elif how == "directory":
        bad.mkdir()
    elif how == "checkpoint":
        torch.save({"state_dict": data["state_dict"], "pytorch-lightning_version": "2.6"}, bad)
    elif how == "foreign":
        torch.save({"weights": 1}, bad)
    else:
        torch.save({**data, "format_version": {"older": 2, "newer": 99}[how]}, bad)
    return bad


@pytest.mark.parametrize("how, message", [
    ("truncated", r"truncated\.pt is not a readable model file: truncated or damaged"),
    ("random", r"random\.pt is not a readable model file: not a torch file"),
    ("empty", r"empty\.pt is empty \(0 bytes\)"),
    ("directory", r"directory\.pt is a directory, not a model file"),
    ("checkpoint", r"checkpoint\.pt is a training checkpoint, not a model file"),
    ("foreign", r"foreign\.pt is not an mfmlip model file"),
    ("older", r"older\.pt has model format 2; this mfmlip reads format 3 .*retrain"),
    ("newer", r"newer\.pt has model format 99, written by a newer mfmlip.*upgrade"),
])
def test_damaged_model_files_are_named_with_what_is_wrong(make_model, tmp_path, how, message):
    save_model(make_model(species=(14,)), tmp_path / "model.pt")
    bad = _damage(tmp_path / "model.pt", tmp_path, how)
    with pytest.raises(ModelFileError, match=message):
        load_model(bad)
    from mfmlip.cli.main import main  # the CLI says the same, exit 2, no traceback

    assert main(["info", str(bad)]) == 2


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model file .*nope\.pt not found"):
        load_model(tmp_path / "nope.pt")


def test_lookup_errors_name_known_entries(make_model):
    model = make_model(species=(1, 8), fidelities=("PBE", "MP2"))
    assert model.fidelity_index("MP2") == 1
    with pytest.raises(ValueError, match=r"unknown fidelity 'CCSD'.*\['PBE', 'MP2'\]"):
        model.fidelity_index("CCSD")
    assert model.species_index(torch.tensor([8, 1, 8])).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"\['C'\].*\['H', 'O'\]"):
        model.species_index(torch.tensor([1, 6]))


def test_energy_only_prediction_respects_no_grad(make_model, si_cell):
    model = make_model()
    batch = atoms_to_batch(si_cell, model.cutoff)
    with torch.no_grad():
        assert not model(batch, compute_forces=False)["energy"].requires_grad  # no graph kept
        assert model(batch, compute_forces=True)["forces"].shape == (len(si_cell), 3)  # still differentiates
