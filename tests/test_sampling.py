"""DIRECT / random / narrow selection (mfmlip.sampling) and ``mfmlip sample``."""

import ase.io
import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator

from mfmlip.cli.main import main
from mfmlip.data.structures import DataError
from mfmlip.model import save_model
from mfmlip.sampling import (
    birch_clusters, direct_counts, direct_select, encode, narrow_select, parse_region, pick_from_clusters,
    principal_components, sample, select,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def blobs(n_blobs=6, per_blob=40, dim=3, spread=0.3, seed=0):
    """Well-separated Gaussian blobs on a grid (spacing 10): points and true blob of each."""
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.array([[i % 3, i // 3, (i * 7) % 2] for i in range(n_blobs)], dtype=float)[:, :dim]
    truth = np.repeat(np.arange(n_blobs), per_blob)
    return centres[truth] + spread * rng.normal(size=(len(truth), dim)), truth


# --- PCA and Kaiser's rule ----------------------------------------------------


def test_pca_eigenvalues_exact_and_kaiser_excludes_eigenvalue_one():
    # x and 2x+1 are perfectly correlated, y is exactly uncorrelated with x (orthogonal
    # +-1 patterns): the correlation matrix has eigenvalues exactly 2, 1, 0
    x = np.tile([1.0, -1.0, 1.0, -1.0], 25)
    y = np.tile([1.0, 1.0, -1.0, -1.0], 25)
    pca = principal_components(np.column_stack([x, 2 * x + 1, y]))
    np.testing.assert_allclose(pca.eigenvalues, [2.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(pca.explained_ratio, [2 / 3, 1 / 3, 0.0], atol=1e-12)
    assert pca.n_components == 1  # Kaiser: strictly greater than 1
    # PC1 is (z_x + z_1)/sqrt(2) with z = +-1, so its scores are +-sqrt(2)
    np.testing.assert_allclose(np.abs(pca.scores[:, 0]), np.sqrt(2.0), atol=1e-12)


def test_kaiser_keeps_one_component_per_correlated_block():
    rng = np.random.default_rng(1)
    factors = rng.normal(size=(500, 3))
    # 3 blocks of 4 columns, each column = its block's factor (scaled, shifted) + 10% noise
    columns = [a * factors[:, b] + c + 0.1 * rng.normal(size=500)
               for b in range(3) for a, c in zip([1.0, -3.0, 0.5, 20.0], [0.0, 5.0, -2.0, 100.0])]
    data = np.column_stack(columns)
    pca = principal_components(data)
    assert pca.n_components == 3
    assert pca.eigenvalues.sum() == pytest.approx(12.0)  # trace of a 12x12 correlation matrix
    assert np.all(pca.eigenvalues[:3] > 3.5) and np.all(pca.eigenvalues[3:] < 0.1)
    assert pca.reduced().shape == (500, 3)
    np.testing.assert_allclose(pca.reduced(), pca.scores[:, :3] * pca.explained_ratio[:3])
    np.testing.assert_allclose(pca.reduced(weighted=False), pca.scores[:, :3])
    assert principal_components(data, n_components=5).n_components == 5
    with pytest.raises(ValueError, match="n_components=13"):
        principal_components(data, n_components=13)
    with pytest.raises(ValueError, match="no feature varies"):
        principal_components(np.ones((10, 4)))
    with pytest.raises(ValueError, match=r"candidates \[2\]"):
        principal_components(np.where(np.arange(40).reshape(10, 4) == 9, np.nan, 1.0))


# --- BIRCH and picking --------------------------------------------------------


def test_birch_finds_the_blobs_and_the_requested_count():
    points, truth = blobs()
    labels, threshold = birch_clusters(points, 6)
    assert threshold > 0
    assert sorted(set(labels.tolist())) == list(range(6))
    for blob in range(6):  # each blob is exactly one cluster
        assert len(set(labels[truth == blob].tolist())) == 1
    labels, _ = birch_clusters(points, 15)
    assert len(set(labels.tolist())) == 15
    with pytest.raises(ValueError, match="fewer than n_clusters=15"):
        birch_clusters(points, 15, threshold=100.0)
    with pytest.raises(ValueError, match="only 2 distinct"):
        birch_clusters(np.repeat([[0.0, 0.0], [1.0, 1.0]], 5, axis=0), 3)


def test_pick_k_per_cluster_closest_to_centroid():
    # clusters on a line: A has 5 points (centroid 2.0), B 3 points (centroid 11), C 1 point
    points = np.array([0.0, 1.0, 2.1, 3.0, 3.9, 10.0, 11.2, 11.8, 50.0])[:, None]
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(pick_from_clusters(points, labels, k=1), [2, 6, 8])
    np.testing.assert_array_equal(pick_from_clusters(points, labels, k=2), [1, 2, 6, 7, 8])
    # n larger than k x clusters allows: more rounds, largest cluster first
    np.testing.assert_array_equal(pick_from_clusters(points, labels, k=2, n=6), [1, 2, 3, 6, 7, 8])
    # n smaller: the last round stops early, larger clusters first
    np.testing.assert_array_equal(pick_from_clusters(points, labels, k=2, n=4), [1, 2, 6, 8])
    assert len(pick_from_clusters(points, labels, k=10)) == 9  # every point, no duplicates
    chosen = pick_from_clusters(points, labels, k=2, pick="random", seed=4)
    assert np.bincount(labels[chosen]).tolist() == [2, 2, 1]


def test_direct_counts_and_exact_totals():
    assert direct_counts(100, None, None) == (100, 1)
    assert direct_counts(100, None, 3) == (34, 3)
    assert direct_counts(100, 30, None) == (30, 4)
    assert direct_counts(None, 7, 2) == (7, 2)
    with pytest.raises(ValueError):
        direct_counts(None, None, 2)
    with pytest.raises(ValueError, match="< n=10"):
        direct_counts(10, 3, 3)
    points, truth = blobs()
    sel = direct_select(points, n=12, seed=0)
    assert len(sel.indices) == len(set(sel.indices.tolist())) == 12
    assert sel.info["n_clusters"] == 12 and sel.info["k"] == 1
    assert np.bincount(sel.labels[sel.indices]).tolist() == [1] * 12  # one per cluster
    sel = direct_select(points, n_clusters=6, k=3, n_components=3)  # Kaiser keeps 1 PC of these blobs
    assert len(sel.indices) == 18
    assert np.bincount(sel.labels[sel.indices]).tolist() == [3] * 6
    # one cluster per blob: every blob is covered, 3 structures each
    assert np.bincount(truth[sel.indices]).tolist() == [3] * 6
    with pytest.raises(ValueError, match=r"n=241: choose an integer 1..240"):
        direct_select(points, n=241)


def test_direct_covers_a_small_far_cluster_that_random_misses():
    rng = np.random.default_rng(2)
    bulk = rng.normal(size=(990, 4))
    outliers = 25.0 + rng.normal(size=(10, 4))
    vectors = np.vstack([bulk, outliers])
    picked = select(vectors, 10, method="direct")
    assert np.any(picked >= 990)
    misses = sum(not np.any(select(vectors, 10, method="random", seed=s) >= 990) for s in range(20))
    assert misses >= 10  # a 10-of-1000 random draw usually misses the 1% of outliers


# --- random, narrow, seeds ----------------------------------------------------


def test_selection_is_reproducible_with_a_seed():
    points, _ = blobs(seed=3)
    for method, options in [("random", {}), ("direct", {"pick": "random", "k": 2}),
                            ("narrow", {"bounds": [(None, 0.0)]})]:
        a = select(points, 10, method=method, seed=7, **options)
        b = select(points, 10, method=method, seed=7, **options)
        np.testing.assert_array_equal(a, b)
        assert len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0)
    draws = {tuple(select(points, 10, method="random", seed=s)) for s in range(5)}
    assert len(draws) == 5
    with pytest.raises(ValueError, match="unknown method"):
        select(points, 10, method="kmeans")


def test_narrow_selects_only_inside_the_box():
    points, _ = blobs(seed=5)
    bounds = parse_region("PC1<0, PC2>-1")
    assert bounds == [(None, 0.0), (-1.0, None)]
    sel = narrow_select(points, 15, bounds=bounds, seed=1)
    scores = sel.pca.scores
    assert np.all(scores[sel.indices, 0] < 0) and np.all(scores[sel.indices, 1] > -1)
    inside = np.flatnonzero((scores[:, 0] < 0) & (scores[:, 1] > -1))
    assert sel.info["n_inside"] == len(inside) and set(sel.indices) <= set(inside)
    with pytest.raises(ValueError, match=rf"holds {len(inside)} of 240 candidates"):
        sample(points, len(inside) + 1, method="narrow", bounds="PC1<0,PC2>-1")
    with pytest.raises(ValueError, match="cannot read region"):
        parse_region("PC1 << 3")


# --- the encoder --------------------------------------------------------------


@pytest.fixture
def tiny_model(make_model):
    return make_model(species=(1, 6, 8), fidelities=("LO", "HI"), channels=8, lmax=1, num_layers=2)


def methanol(seed=0, rattle=0.05):
    atoms = molecule("CH3OH")
    atoms.rattle(rattle, seed=seed)
    return atoms


def rotated_permuted(atoms, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))  # proper rotation
    perm = rng.permutation(len(atoms))
    moved = atoms[perm]
    moved.positions = moved.positions @ q.T + rng.normal(size=3)
    return moved


@pytest.mark.parametrize("pooling, dim", [("mean", 8), ("species", 8 * 4)])
def test_encoder_invariant_to_rotation_translation_and_permutation(tiny_model, pooling, dim):
    atoms = methanol()
    other = methanol(seed=1, rattle=0.2)
    vectors = encode([atoms, rotated_permuted(atoms), other, rotated_permuted(other, seed=2)], tiny_model,
                     pooling=pooling)
    assert vectors.shape == (4, dim) and vectors.dtype == np.float64
    np.testing.assert_allclose(vectors[1], vectors[0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(vectors[3], vectors[2], rtol=0, atol=1e-10)
    assert np.abs(vectors[0] - vectors[2]).max() > 1e-4  # different structures, different vectors
    # batching does not change the result
    np.testing.assert_allclose(encode([atoms, other], tiny_model, batch_size=1, pooling=pooling),
                               vectors[[0, 2]], rtol=0, atol=1e-12)
    np.testing.assert_allclose(encode([atoms, other, atoms], tiny_model, max_atoms=7, pooling=pooling),
                               vectors[[0, 2, 0]], rtol=0, atol=1e-12)


def test_encoder_fidelity_species_and_callables(tiny_model):
    frames = [methanol(), molecule("H2O")]
    default = encode(frames, tiny_model)
    np.testing.assert_array_equal(default, encode(frames, tiny_model, fidelity="LO"))
    assert np.abs(encode(frames, tiny_model, fidelity="HI") - default).max() > 1e-6  # one-hot enters the layers
    species = encode(frames, tiny_model, pooling="species")
    np.testing.assert_allclose(species[:, :8], default)
    np.testing.assert_array_equal(species[1, 8 * 2 : 8 * 3], 0.0)  # water has no carbon (species 6)
    with pytest.raises(ValueError, match="unknown fidelity 'MP2'"):
        encode(frames, tiny_model, fidelity="MP2")
    with pytest.raises(DataError, match=r"structure 1: element\(s\) \['N'\] unknown"):
        encode([methanol(), molecule("NH3")], tiny_model)
    lengths = encode(frames, lambda a: [len(a), a.get_masses().sum()])
    np.testing.assert_allclose(lengths, [[6, 32.042], [3, 18.015]], atol=1e-2)
    with pytest.raises(ValueError, match="structure 1: encoder returned 2 values"):
        encode(frames, lambda a: np.ones(len(a) - 1))


# --- the command line ---------------------------------------------------------


def test_cli_sample_end_to_end(tiny_model, tmp_path, capsys):
    model_path = tmp_path / "model.pt"
    save_model(tiny_model, model_path)
    frames = []
    for i in range(40):
        atoms = methanol(seed=i, rattle=0.02 + 0.01 * (i % 7))
        atoms.calc = SinglePointCalculator(atoms, energy=-100.0 - i, forces=np.full((6, 3), 0.1 * i))
        atoms.info["fidelity"] = "LO"
        frames.append(atoms)
    candidates = tmp_path / "candidates.extxyz"
    ase.io.write(candidates, frames)
    out = tmp_path / "picked" / "picked.extxyz"
    assert main(["sample", str(model_path), str(candidates), "--n", "5", "--method", "direct",
                 "-o", str(out), "--no-progress", "--index", "4:"]) == 0
    text = capsys.readouterr().out
    assert "encoded 36 structures" in text and "selected 5 of 36" in text
    picked = ase.io.read(out, ":")
    assert len(picked) == 5
    sources = [a.info["source_index"] for a in picked]
    assert len(set(sources)) == 5 and all(4 <= s < 40 for s in sources)  # frame numbers in the file
    for atoms, s in zip(picked, sources):
        np.testing.assert_allclose(atoms.positions, frames[s].positions, atol=1e-6)
        assert atoms.get_potential_energy() == pytest.approx(-100.0 - s)
        np.testing.assert_allclose(atoms.get_forces(), 0.1 * s)
    assert (out.parent / "picked_pca.png").read_bytes()[:8] == PNG_MAGIC

    plot = tmp_path / "narrow.png"
    assert main(["sample", str(model_path), str(candidates), "--n", "3", "--method", "narrow",
                 "--region", "PC1<0", "-o", str(tmp_path / "narrow.extxyz"), "--plot", str(plot),
                 "--no-progress"]) == 0
    assert len(ase.io.read(tmp_path / "narrow.extxyz", ":")) == 3 and plot.read_bytes()[:8] == PNG_MAGIC

    assert main(["sample", str(model_path), str(candidates), "--n", "3", "--method", "narrow",
                 "-o", str(tmp_path / "x.extxyz")]) == 2
    assert "needs --region" in capsys.readouterr().err
    assert main(["sample", str(model_path), str(candidates), "--n", "3", "--fidelity", "MP2",
                 "-o", str(tmp_path / "x.extxyz")]) == 2
    assert "unknown fidelity 'MP2'" in capsys.readouterr().err
