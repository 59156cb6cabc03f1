"""The one potential interface and the front-ends on the one inference path."""

import numpy as np
import pytest
import torch
from ase.build import molecule

from conftest import rattled_si
from mfmlip import MFCalculator
from mfmlip.data.structures import structure_from_atoms
from mfmlip.model import DeltaPotential, ModelSpec, validate_potential
from mfmlip.model.fidelity import SCHEMES
from mfmlip.model.inference import SMALL_BATCH_ATOMS, Predictor, chunks, resolve_dtype


def _potentials(make_model):
    """One potential of every kind: each scheme, and a delta model."""
    kinds = {}
    for scheme in sorted(SCHEMES):
        model = make_model(species=(1, 6, 8, 14), fidelity_scheme=scheme, e0=torch.full((2, 4), -3.0))
        with torch.no_grad():
            for p in model.fidelity.parameters():
                p.normal_()
        kinds[scheme] = model
    base = make_model(species=(1, 6, 8, 14), seed=1)
    kinds["delta"] = DeltaPotential(base, "PBE", make_model(species=(1, 6, 8, 14), seed=2))
    return kinds


@pytest.mark.parametrize("kind", [*sorted(SCHEMES), "delta"])
def test_every_potential_kind_keeps_the_contract(make_model, kind):
    model = _potentials(make_model)[kind]
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.05, seed=1)
    batch = Predictor(model, "SCAN").batch([rattled_si(), ethanol])
    validate_potential(model, batch)


def test_validator_catches_a_broken_force(make_model):
    model = make_model(species=(14,))
    original = model.forward

    def wrong_sign(batch, compute_forces=True, compute_stress=False):
        out = original(batch, compute_forces, compute_stress)
        if compute_forces:
            out["forces"] = -out["forces"]
        return out

    model.forward = wrong_sign
    with pytest.raises(AssertionError, match="is not -dE/dx"):
        validate_potential(model, Predictor(model, "PBE").batch([rattled_si()]))


@pytest.fixture
def calc(make_model):
    return MFCalculator(make_model(species=(14,)), fidelity="PBE")


def test_calculator_parameters_and_todict(calc):
    assert calc.parameters["fidelity"] == "PBE"
    assert calc.parameters["device"] == "cpu"
    assert calc.parameters["dtype"] == "float64"
    assert calc.parameters["min_distance"] == pytest.approx(0.1)
    assert calc.todict() == {"fidelity": "PBE", "dtype": "float64"}  # skip_default drops the defaults
    assert calc.todict(skip_default=False)["device"] == "cpu"


@pytest.mark.parametrize("switch", ["set", "attribute"])
def test_switching_the_fidelity_changes_the_answer_and_clears_results(make_model, switch):
    model = make_model(species=(14,))
    atoms = rattled_si()
    atoms.calc = MFCalculator(model, fidelity="PBE")
    pbe = atoms.get_potential_energy()
    if switch == "set":
        assert atoms.calc.set(fidelity="SCAN") == {"fidelity": "SCAN"}
    else:
        atoms.calc.fidelity = "SCAN"
    assert atoms.calc.results == {}
    scan = atoms.get_potential_energy()
    fresh = rattled_si()
    fresh.calc = MFCalculator(model, fidelity="SCAN")
    assert scan == pytest.approx(fresh.get_potential_energy(), abs=1e-10)
    assert abs(scan - pbe) > 1e-6
    assert atoms.calc.fidelity == "SCAN" and atoms.calc.parameters["fidelity"] == "SCAN"


def test_unknown_fidelity_in_set_raises_and_changes_nothing(calc):
    with pytest.raises(ValueError, match=r"unknown fidelity 'MP2'; this model has \['PBE', 'SCAN'\]"):
        calc.set(fidelity="MP2")
    with pytest.raises(ValueError, match="unknown fidelity"):
        calc.fidelity = "MP2"
    assert calc.parameters["fidelity"] == "PBE"
    assert calc.predictor.fidelity == "PBE"


@pytest.mark.parametrize("dtype", ["float16", "fp64", "bfloat16", torch.float16])
def test_unsupported_dtypes_are_refused(make_model, calc, dtype):
    with pytest.raises(ValueError, match=r"is not supported; choose from \['float32', 'float64'\]"):
        MFCalculator(make_model(species=(14,)), fidelity="PBE", dtype=dtype)
    with pytest.raises(ValueError, match="is not supported"):
        calc.set(dtype=dtype)


def test_set_dtype_and_min_distance_take_effect(calc):
    atoms = rattled_si()
    atoms.calc = calc
    e64 = atoms.get_potential_energy()
    calc.set(dtype="float32")
    assert calc.model.dtype == torch.float32
    assert atoms.get_potential_energy() == pytest.approx(e64, abs=1e-4)
    calc.set(min_distance=3.0)
    with pytest.raises(ValueError, match="closer than"):
        atoms.get_potential_energy()


def test_per_atom_energies_sum_to_the_energy(calc):
    atoms = rattled_si()
    atoms.calc = calc
    energies = atoms.get_potential_energies()
    assert energies.shape == (len(atoms),)
    assert energies.sum() == pytest.approx(atoms.get_potential_energy(), abs=1e-9)


def test_predictor_matches_the_calculator_in_batches(make_model):
    model = make_model(species=(14,))
    structures = []
    for seed in range(5):
        atoms = rattled_si()
        atoms.rattle(0.02, seed=seed)
        atoms.info.update(fidelity="SCAN", energy=0.0)
        structures.append(structure_from_atoms(atoms))
    predictor = Predictor(model, "SCAN")
    energies = np.concatenate([p["energy"].numpy() for _, _, p in predictor.predict(structures, batch_size=2)])
    calc = MFCalculator(model, fidelity="SCAN")
    for s, e in zip(structures, energies):
        atoms = rattled_si()
        atoms.positions = s.positions
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(float(e), abs=1e-9)


def test_chunks_respect_both_limits():
    class S:
        def __init__(self, n):
            self.n_atoms = n

    sizes = [[s.n_atoms for s in c] for c in chunks([S(3), S(3), S(3), S(10), S(1)], batch_size=2, max_atoms=7)]
    assert sizes == [[3, 3], [3], [10], [1]]


def _threads_during_calls(calc, atoms_list) -> list[int]:
    seen = []
    calc.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    for atoms in atoms_list:
        atoms.calc = calc
        atoms.get_forces()
    return seen


def test_small_systems_run_on_one_thread_and_the_setting_is_restored(make_model):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small, large = rattled_si(), rattled_si() * (4, 4, 4)  # 4 and 256 atoms
        assert len(small) < SMALL_BATCH_ATOMS <= len(large)
        calc = MFCalculator(make_model(species=(14,)), fidelity="PBE")
        assert _threads_during_calls(calc, [small, large]) == [1, 2]
        calc.set(threads=2)
        assert calc.parameters["threads"] == 2
        assert _threads_during_calls(calc, [small.copy()]) == [2]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        Predictor(make_model(species=(14,)), "PBE", threads=0)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        calc.set(threads=0)


def test_predictor_requires_a_fidelity(make_model):
    with pytest.raises(ValueError, match=r"fidelity is required; this model has \['PBE', 'SCAN'\]"):
        Predictor(make_model(species=(14,)), None)
    assert resolve_dtype("torch.float64") == torch.float64


def test_spec_refuses_an_option_its_scheme_lacks():
    with pytest.raises(ValueError, match=r"fidelity_dim is not an option of fidelity scheme 'one_hot_linear'"):
        ModelSpec(species=[1], fidelities=["PBE"], fidelity_dim=4)
    with pytest.raises(ValueError, match=r"fidelity_sites is not an option of fidelity scheme 'heads' .*none"):
        ModelSpec(species=[1], fidelities=["PBE"], fidelity_scheme="heads", fidelity_sites=["pre"])


def test_state_embedding_table_is_held_once(make_model):
    model = make_model(species=(14,), fidelity_scheme="state_embedding", fidelity_dim=4)
    tables = [k for k in model.state_dict() if k.endswith("embedding.weight") and "fidelity" in k]
    assert tables == ["fidelity.embedding.weight"]
