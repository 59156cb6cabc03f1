import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from mfmlip.data import (
    DataError,
    Structure,
    build_e0_table,
    collate,
    filter_structures,
    fit_e0,
    neighbor_list,
    read_structures,
    split_indices,
    structure_from_atoms,
    structure_to_graph,
    to_device,
)
from mfmlip.data.selection import read_split_file

from conftest import rattled_si


def make_structure(numbers, energy=float("nan"), forces=None, fidelity="PBE", seed=0):
    rng = np.random.default_rng(seed)
    n = len(numbers)
    return Structure(
        positions=rng.uniform(0, 3, (n, 3)),
        atomic_numbers=np.asarray(numbers, dtype=np.int64),
        cell=np.zeros((3, 3)),
        pbc=np.zeros(3, bool),
        fidelity=fidelity,
        energy=energy,
        forces=forces,
    )


# --- E0 -------------------------------------------------------------------

SPECIES = [1, 6, 8]
TRUE_E0 = np.array([-13.6, -1029.5, -2041.9])


def composition_structures(n=30, seed=0, noise=1e-6):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        counts = rng.integers(0, 6, size=3)
        counts[rng.integers(3)] += 1  # never empty
        numbers = np.repeat(SPECIES, counts)
        energy = counts @ TRUE_E0 + rng.normal(0, noise)
        out.append(make_structure(numbers, energy, seed=k))
    return out


def test_fit_e0_recovers_known_reference_energies():
    structures = composition_structures()
    e0 = fit_e0(structures, SPECIES)
    np.testing.assert_allclose(e0, TRUE_E0, atol=1e-4)


def test_fit_e0_ignores_structures_without_energy_and_species_absent_get_zero():
    structures = composition_structures(n=20)
    structures.append(make_structure([1, 8, 8], energy=float("nan")))
    structures.append(make_structure([1, 1, 1], energy=float("nan")))
    e0 = fit_e0(structures, SPECIES + [14])
    np.testing.assert_allclose(e0[:3], TRUE_E0, atol=1e-4)
    assert e0[3] == 0.0


def test_fit_e0_single_composition_is_min_norm_and_reproduces_mean_energy():
    # every structure is malonaldehyde C3H4O2: the composition matrix has rank 1
    numbers = [1] * 4 + [6] * 3 + [8] * 2
    rng = np.random.default_rng(1)
    energies = -450.0 + rng.normal(0, 0.1, 25)
    structures = [make_structure(numbers, e, seed=k) for k, e in enumerate(energies)]
    e0 = fit_e0(structures, SPECIES)
    counts = np.array([4.0, 3.0, 2.0])
    assert np.all(np.isfinite(e0))
    assert counts @ e0 == pytest.approx(energies.mean(), abs=1e-8)
    # minimum-norm solution lies along the composition vector
    np.testing.assert_allclose(e0, counts * energies.mean() / (counts @ counts), rtol=1e-10)
    ridged = fit_e0(structures, SPECIES, ridge=1e-3)
    assert counts @ ridged == pytest.approx(energies.mean(), abs=1e-3)


def test_fit_e0_without_energies_raises():
    with pytest.raises(DataError, match="no structure"):
        fit_e0([make_structure([1, 8])], SPECIES)


def test_build_e0_table_takes_given_values_and_fits_the_others():
    fitted = composition_structures(n=20, seed=3)
    for s in fitted:
        s.fidelity = "PBE"
    other = [make_structure([1, 8], energy=-7.0, fidelity="MP2")]  # would fit to something else
    given = {"MP2": {"H": -0.5, "O": -75.25, "Si": -3.0}}  # Si is not a model species: ignored
    table = build_e0_table(fitted + other, SPECIES, ["PBE", "MP2"], given=given)
    assert table.shape == (2, 3)
    np.testing.assert_allclose(table[0], TRUE_E0, atol=1e-4)
    np.testing.assert_array_equal(table[1], [-0.5, 0.0, -75.25])  # C not given -> 0
    with pytest.raises(DataError, match="'Xx'"):
        build_e0_table(fitted, SPECIES, ["PBE"], given={"PBE": {"Xx": 1.0}})


# --- filters and splits -----------------------------------------------------


def test_filter_structures_drops_high_energy_and_high_force_frames():
    water, peroxide = [1, 1, 8], [1, 1, 8, 8]
    structures = []
    for k in range(10):
        numbers = water if k % 2 else peroxide
        energy = -2.0 * 1 + (-5.0) * numbers.count(8) + 0.01 * k  # composition + < 0.05 eV/atom
        structures.append(make_structure(numbers, energy, forces=np.full((len(numbers), 3), 0.5), seed=k))
    structures[3].energy += 3.0  # +1 eV/atom above the rest
    structures[6].forces[1, 2] = -20.0  # one large force component
    structures[8].energy = float("nan")  # no energy: cannot be judged, kept
    kept, dropped = filter_structures(structures, max_energy_above_min_per_atom=0.5, max_abs_force=10.0)
    assert dropped.tolist() == [3, 6]
    assert len(kept) == 8 and any(s is structures[8] for s in kept)
    assert all(s is structures[i] for s, i in zip(kept, [0, 1, 2, 4, 5, 7, 8, 9]))
    # each filter alone
    assert filter_structures(structures, max_abs_force=10.0)[1].tolist() == [6]
    assert filter_structures(structures, max_energy_above_min_per_atom=0.5)[1].tolist() == [3]
    assert filter_structures(structures)[1].size == 0


def test_split_indices_disjoint_with_requested_sizes():
    parts = split_indices(100, train=None, val=0.1, test=25, seed=3)
    sizes = {k: len(v) for k, v in parts.items()}
    assert sizes == {"train": 65, "val": 10, "test": 25}
    together = np.concatenate(list(parts.values()))
    assert len(np.unique(together)) == 100 and together.min() == 0 and together.max() == 99


def test_split_indices_reproducible_and_seed_dependent():
    a = split_indices(200, train=100, val=20, test=30, seed=7)
    b = split_indices(200, train=100, val=20, test=30, seed=7)
    c = split_indices(200, train=100, val=20, test=30, seed=8)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["test"], c["test"])


def test_split_indices_test_set_does_not_move_when_train_size_changes():
    small = split_indices(300, train=20, val=10, test=50, seed=1)
    large = split_indices(300, train=200, val=10, test=50, seed=1)
    rest = split_indices(300, train=None, val=10, test=50, seed=1)
    np.testing.assert_array_equal(small["test"], large["test"])
    np.testing.assert_array_equal(small["test"], rest["test"])
    assert len(small["train"]) == 20 and len(large["train"]) == 200
    assert np.intersect1d(large["train"], large["test"]).size == 0


def test_split_indices_too_large_raises():
    with pytest.raises(DataError, match="more than the 10 frames"):
        split_indices(10, train=8, val=2, test=1)


def test_split_indices_rejects_negative_sizes():
    with pytest.raises(DataError):
        parts = split_indices(100, train=None, val=10, test=-5)
        # what currently happens instead: overlapping splits
        assert np.intersect1d(parts["train"], parts["test"]).size == 0


def test_read_split_file_valid_yaml_and_json(tmp_path):
    (tmp_path / "s.yaml").write_text("train: [0, 1, 2]\nval: [3]\ntest: [4, 5]\n")
    parts = read_split_file(tmp_path / "s.yaml", 6)
    assert parts["train"].tolist() == [0, 1, 2] and parts["test"].tolist() == [4, 5]
    (tmp_path / "s.json").write_text(json.dumps({"train": [5, 4], "val": [0]}))
    parts = read_split_file(tmp_path / "s.json", 6)
    assert parts["train"].tolist() == [5, 4] and parts["test"].size == 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("train: [0, 1]\nval: [1]\n", "overlap"),
        ("train: [0, 1]\ntest: [10]\n", "out of range"),
        ("train: [0, -1]\n", "out of range"),
        ("train: [0]\nvalidation: [1]\n", "unknown keys \\['validation'\\]"),
    ],
    ids=["overlap", "too-large", "negative", "unknown-key"],
)
def test_read_split_file_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "split.yaml"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        read_split_file(path, 10)
    assert str(path) in str(err.value)


def test_read_split_file_missing(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_split_file(tmp_path / "absent.yaml", 10)


# --- neighbour lists and graphs ------------------------------------------------


def _edge_set(i, j, shifts, distances):
    return sorted(
        (int(a), int(b), *map(int, s), round(float(d), 9)) for a, b, s, d in zip(i, j, shifts, distances)
    )


@pytest.mark.parametrize("cutoff", [3.0, 6.5])  # 6.5 A exceeds the cell: several images
def test_neighbor_list_matches_ase_for_triclinic_periodic_cell(cutoff):
    atoms = rattled_si()
    i_ref, j_ref, d_ref, s_ref = ase_neighbor_list("ijdS", atoms, cutoff)
    edge, shifts = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    assert edge.dtype == np.int64 and shifts.dtype == np.int64
    vectors = atoms.positions[edge[1]] - atoms.positions[edge[0]] + shifts @ atoms.cell.array
    d = np.linalg.norm(vectors, axis=1)
    assert edge.shape[1] == len(i_ref) > 0
    assert _edge_set(edge[0], edge[1], shifts, d) == _edge_set(i_ref, j_ref, s_ref, d_ref)
    assert d.max() < cutoff


def test_neighbor_list_matches_ase_for_molecule():
    atoms = molecule("CH3CH2OH")
    i_ref, j_ref, d_ref, s_ref = ase_neighbor_list("ijdS", atoms, 2.0)
    edge, shifts = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 2.0)
    d = np.linalg.norm(atoms.positions[edge[1]] - atoms.positions[edge[0]], axis=1)
    assert not shifts.any()
    assert _edge_set(edge[0], edge[1], shifts, d) == _edge_set(i_ref, j_ref, s_ref, d_ref)


def test_neighbor_list_rejects_zero_volume_periodic_cell():
    with pytest.raises(DataError, match="zero volume"):
        neighbor_list(np.zeros((2, 3)) + [[0, 0, 0], [1, 0, 0]], np.zeros((3, 3)), np.ones(3, bool), 3.0)


def test_collate_offsets_edges_and_builds_batch_vector():
    s1 = make_structure([1, 8, 1], energy=-1.0, forces=np.ones((3, 3)))
    s2 = make_structure([6, 1], fidelity="MP2", seed=1)
    g1, g2 = structure_to_graph(s1, 5.0, 0), structure_to_graph(s2, 5.0, 1)
    batch = collate([g1, g2])
    assert batch["batch"].tolist() == [0, 0, 0, 1, 1]
    assert batch["fidelity"].tolist() == [0, 1]
    assert batch["n_atoms"].tolist() == [3, 2]
    n1 = g1["edge_index"].shape[1]
    assert torch.equal(batch["edge_index"][:, :n1], g1["edge_index"])
    assert torch.equal(batch["edge_index"][:, n1:], g2["edge_index"] + 3)
    assert batch["energy_mask"].tolist() == [True, False]
    assert batch["forces_mask"].tolist() == [True, True, True, False, False]
    assert batch["stress_mask"].tolist() == [False, False]
    assert batch["cell"].shape == (2, 3, 3) and batch["stress"].shape == (2, 3, 3)
    moved = to_device(batch, "cpu", torch.float32)
    assert moved["positions"].dtype == torch.float32 and moved["edge_index"].dtype == torch.long


def test_structure_from_atoms_reads_calculator_info_and_voigt_stress():
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = rattled_si()
    forces = np.arange(len(atoms) * 3, dtype=float).reshape(-1, 3)
    atoms.calc = SinglePointCalculator(atoms, energy=-21.5, forces=forces, stress=np.arange(1.0, 7.0))
    atoms.info["fidelity"] = "PBE"
    s = structure_from_atoms(atoms)
    assert s.energy == -21.5 and s.fidelity == "PBE" and s.pbc.all()
    np.testing.assert_array_equal(s.forces, forces)
    # ASE Voigt order xx yy zz yz xz xy
    np.testing.assert_array_equal(s.stress, [[1, 6, 5], [6, 2, 4], [5, 4, 3]])
    assert structure_from_atoms(atoms, fidelity="override").fidelity == "override"


# --- the real data ---------------------------------------------------------------


def test_real_ccsdt_file_has_energies_without_forces(data_file):
    path = data_file("malonaldehyde/CCSDT_CBS.extxyz")
    structures = read_structures(path, index="0:20")
    assert len(structures) == 20
    assert [s.frame for s in structures] == list(range(20))
    assert all(s.fidelity == "CCSD(T)/CBS" for s in structures)
    assert all(np.isfinite(s.energy) and s.forces is None and s.stress is None for s in structures)
    assert structures[0].energy == pytest.approx(0.017752922259848272, abs=1e-12)
    assert sorted(structures[0].atomic_numbers.tolist()) == [1] * 4 + [6] * 3 + [8] * 2
    assert str(path) in structures[3].source and "frame 3" in structures[3].source
    graph = structure_to_graph(structures[0], 5.0, 1)
    assert graph["energy_mask"].tolist() == [True]
    assert not graph["forces_mask"].any() and graph["forces_mask"].shape == (9,)
    assert torch.all(graph["forces"] == 0)  # zero-filled, masked out of the loss


def test_real_xtb_file_has_forces_on_the_same_structures(data_file):
    ccsdt = read_structures(data_file("malonaldehyde/CCSDT_CBS.extxyz"), index="5:10")
    xtb = read_structures(data_file("malonaldehyde/GFN2-xTB.extxyz"), index="5:10")
    assert [s.frame for s in xtb] == [5, 6, 7, 8, 9]
    for a, b in zip(ccsdt, xtb):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-7)
        assert b.fidelity == "GFN2-xTB" and b.forces.shape == (9, 3) and np.isfinite(b.energy)
    graph = structure_to_graph(xtb[0], 5.0, 0)
    assert graph["forces_mask"].all()


def test_real_silicon_file_is_periodic(data_file):
    structures = read_structures(data_file("silicon/PBE_training.extxyz"), index="0:3")
    for s in structures:
        assert s.pbc.all() and abs(np.linalg.det(s.cell)) > 10.0
        assert s.forces.shape == (s.n_atoms, 3) and s.stress is None
        assert set(s.atomic_numbers.tolist()) == {14}
    graph = structure_to_graph(structures[0], 5.0, 0)
    assert graph["shifts"].abs().sum() > 0  # edges cross the periodic boundary


def test_frame_numbers_for_negative_index_are_positions_in_file(data_file):
    structures = read_structures(data_file("malonaldehyde/CCSDT_CBS.extxyz"), index="-3:")
    assert [s.frame for s in structures] == [10142, 10143, 10144]


def test_atoms_with_pbc_but_no_cell_is_rejected_with_field():
    from mfmlip.data.graph import atoms_to_batch

    atoms = Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]], pbc=True)
    with pytest.raises(DataError, match="field 'cell'.*zero volume"):
        atoms_to_batch(atoms, 3.0)


def test_short_step_budgeted_epochs_repeat_the_data_evenly():
    from collections import Counter

    from mfmlip.training.data import EpochShuffle, make_loader

    loader = make_loader([{}] * 10, batch_size=4, shuffle=True, min_batches=25)
    assert len(loader) >= 25  # one epoch spans the validation interval
    sampler = EpochShuffle(10, seed=3, passes=10)
    assert set(Counter(sampler).values()) == {10}  # every structure equally often
    sampler.set_epoch(1)
    again = EpochShuffle(10, seed=3, passes=10)
    again.set_epoch(1)
    assert list(sampler) == list(again)  # depends only on (seed, epoch): resumable
    assert list(EpochShuffle(10, seed=3))[:10] == list(EpochShuffle(10, seed=3, passes=2))[:10]


def test_withheld_labels_are_not_trained_on_but_scored_on_test(tmp_path):
    from tiny_runs import write_water

    from mfmlip.training.config import Config
    from mfmlip.training.data import prepare_data

    write_water(tmp_path / "water.extxyz", n=12)
    cfg = Config.model_validate({"data": {"files": [
        {"path": "water.extxyz", "labels": ["energy"], "split": {"train": 6, "val": 3, "test": 3}}]}})
    data = prepare_data(cfg, tmp_path)
    assert all(s.forces is None for k in ("train", "val") for s in data.splits[k])
    assert all(s.forces is not None and np.isfinite(s.energy) for s in data.splits["test"])


# --- split sizes: fractions that fit always fit ---------------------------------


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.7, 0.15, 0.15), (0.5, 0.25, 0.25), (1 / 3, 1 / 3, 1 / 3),
                                       (0.6, 0.3, 0.1), (0.0, 0.5, 0.5)])
def test_split_fractions_adding_up_to_one_always_fit(fractions):
    for n in range(1, 80):
        sizes = {k: len(v) for k, v in split_indices(n, *fractions).items()}
        assert sum(sizes.values()) == n, (n, sizes)
        for k, f in zip(("train", "val", "test"), fractions):
            assert abs(sizes[k] - f * n) < 1, (n, sizes)  # each within one frame of its share
    assert {k: len(v) for k, v in split_indices(35, 0.8, 0.1, 0.1).items()} == {"train": 28, "val": 3, "test": 4}


def test_split_fractions_below_one_with_the_rest_fit_and_keep_the_test_size():
    for n in range(1, 80):
        sizes = {k: len(v) for k, v in split_indices(n, None, 0.5, 0.5).items()}
        assert sum(sizes.values()) == n
        assert len(split_indices(n, None, 0.1, 0.1)["test"]) == round(0.1 * n)  # as before: test drawn alone
    assert len(split_indices(35, 0.7, 0.1, 0.1)["test"]) == len(split_indices(35, 0.8, 0.1, 0.1)["test"])


def test_split_sizes_that_do_not_fit_are_named():
    with pytest.raises(DataError, match=r"^split sizes \(train 0\.9, val 0\.1, test 0\.1\) ask for train 32, "
                                        r"val 4, test 4: 40 frames, more than the 35 frames available$"):
        split_indices(35, 0.9, 0.1, 0.1)
    with pytest.raises(DataError, match=r"^split sizes must not be negative: test -5$"):
        split_indices(100, None, 10, -5)


def test_split_errors_name_the_data_files_entry(tmp_path):
    from tiny_runs import write_water

    from mfmlip.training.config import Config
    from mfmlip.training.data import prepare_data

    write_water(tmp_path / "a.extxyz", n=12)
    write_water(tmp_path / "b.extxyz", n=5)
    cfg = Config.model_validate({"data": {"files": [
        {"path": "a.extxyz", "split": {"train": 0.8, "val": 0.1, "test": 0.1}},
        {"path": "b.extxyz", "split": {"train": 4, "val": 2, "test": 0}}]}})
    with pytest.raises(DataError, match=r"^data\.files\[1\] \(b\.extxyz\): split sizes \(train 4, val 2, test 0\) "
                                        r"ask for .*more than the 5 frames available$"):
        prepare_data(cfg, tmp_path)
    cfg.data.files[1].split.file = "missing.yaml"
    with pytest.raises(DataError, match=r"^data\.files\[1\] \(b\.extxyz\): split file .*missing\.yaml: not found$"):
        prepare_data(cfg, tmp_path)
