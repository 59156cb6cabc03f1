import csv

import ase.io
import matplotlib
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.geometry.rdf import get_rdf

from mfmlip.analysis.evaluate import parity_plot
from mfmlip.analysis.structure import adf, coordination, parse_species, rdf
from mfmlip.cli.main import main
from mfmlip.sampling import plot_selection, sample
from mfmlip.simulation.eos import EOSResult, fit_eos, plot_eos
from mfmlip.study.report import learning_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (structure, pair, first-shell distance, second-shell distance, first-shell coordination number)
CRYSTALS = {
    "fcc-Cu": (lambda: bulk("Cu", "fcc", a=3.61), 3.61 / np.sqrt(2), 3.61, 12),
    "bcc-Fe": (lambda: bulk("Fe", "bcc", a=2.87), 2.87 * np.sqrt(3) / 2, 2.87, 8),
    "diamond-Si": (lambda: bulk("Si", "diamond", a=5.43), 5.43 * np.sqrt(3) / 4, 5.43 / np.sqrt(2), 4),
}


def ideal_gas(n_frames, counts, box, seed):
    """Uncorrelated uniform positions in a periodic cubic box: an ideal gas, g(r) = 1."""
    rng = np.random.default_rng(seed)
    symbols = "".join(f"{s}{n}" for s, n in counts.items())
    n = sum(counts.values())
    return [Atoms(symbols, positions=rng.uniform(0, box, (n, 3)), cell=[box] * 3, pbc=True) for _ in range(n_frames)]


def read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], np.array(rows[1:], dtype=float)


# --- radial distribution function ------------------------------------------


def test_ideal_gas_rdf_is_one_within_counting_noise():
    # 30 Ar + 20 Ne in an 8 A box, 400 frames. g(r) is a pair count divided by
    # its ideal-gas expectation m(r), so its noise is counting noise: each
    # unordered A-A pair is counted twice (i->j and j->i), sigma_rel = sqrt(2/m);
    # each A-B pair once, sigma_rel = sqrt(1/m). 5 sigma per bin, 4 sigma pooled.
    box, n_frames, counts = 8.0, 400, {"Ar": 30, "Ne": 20}
    result = rdf(ideal_gas(n_frames, counts, box, seed=1), ["Ar-Ar", "Ar-Ne", "Ne-Ne"], rmax=4.0, bins=40)
    assert result.n_frames == n_frames and result.edges[-1] == 4.0 and result.r.shape == (40,)
    shell = 4 / 3 * np.pi * (result.edges[1:] ** 3 - result.edges[:-1] ** 3)
    for pair, (na, nb, twice) in {"Ar-Ar": (30, 29, True), "Ar-Ne": (30, 20, False), "Ne-Ne": (20, 19, True)}.items():
        g = result.g[pair]
        expected = n_frames * na * nb / box**3 * shell  # ordered pairs in each shell, all frames
        sigma = np.sqrt((2.0 if twice else 1.0) / expected)
        far = result.r > 1.0  # >= ~100 expected counts per bin there
        assert np.all(np.abs(g[far] - 1) < 5 * sigma[far]), pair
        pooled = np.sum(g[far] * expected[far]) / expected[far].sum()
        pooled_sigma = np.sqrt((2.0 if twice else 1.0) / expected[far].sum())
        assert abs(pooled - 1) < 4 * pooled_sigma, (pair, pooled, pooled_sigma)
        if twice:
            # the (N_B - 1) normalisation matters: N_B^2 would give (N-1)/N, > 8 sigma off
            assert abs(pooled * (nb / (nb + 1)) - 1) > 8 * pooled_sigma
        # running coordination number of an ideal gas: (N_B - delta) / V * 4/3 pi r^3
        n_expected = nb / box**3 * 4 / 3 * np.pi * result.edges[1:] ** 3
        np.testing.assert_allclose(result.n[pair][-1], n_expected[-1], rtol=0.01)


@pytest.mark.parametrize("name", list(CRYSTALS))
def test_crystal_rdf_first_shell_and_agreement_with_ase(name):
    build, r1, r2, cn = CRYSTALS[name]
    atoms = build().repeat(4)
    symbol = atoms[0].symbol
    pair = f"{symbol}-{symbol}"
    result = rdf(atoms, [pair], bins=300)
    width = result.edges[1]
    # rmax defaults to half the smallest cell width (capped at 10 A)
    widths = atoms.cell.volume / np.linalg.norm(np.cross(atoms.cell[[1, 2, 0]], atoms.cell[[2, 0, 1]]), axis=1)
    assert result.edges[-1] == pytest.approx(min(widths.min() / 2, 10.0))
    r_peak, g_peak = result.first_peak(pair)
    assert abs(r_peak - r1) <= width and g_peak > 5
    assert np.all(result.g[pair][result.r < r1 - width] == 0)  # nothing inside the first shell
    # running coordination number between the first and second shell = first-shell CN
    between = np.searchsorted(result.edges[1:], 0.5 * (r1 + r2))
    assert result.n[pair][between] == pytest.approx(cn, abs=1e-12)
    # same histogram as ASE's own get_rdf, which normalises with N^2 instead of N(N-1)
    ase_g, ase_r = get_rdf(atoms, result.edges[-1], 300, elements=[symbol, symbol])
    np.testing.assert_allclose(ase_r, result.r, rtol=0, atol=1e-12)
    n = len(atoms)
    # (the last bin is left out: for bcc a shell lies exactly at rmax, which ASE
    # counts and neighbor_list, with its strict d < cutoff, does not)
    np.testing.assert_allclose(result.g[pair][:-1] * (n - 1) / n, ase_g[:-1], rtol=1e-10, atol=1e-12)


def test_rdf_of_two_species_rocksalt():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(3)
    result = rdf([atoms, atoms.copy()], ["Na-Cl", "Cl-Na", "Na-Na"], rmax=5.0, bins=250)
    assert result.first_peak("Na-Cl")[0] == pytest.approx(2.82, abs=0.02)
    assert result.first_peak("Na-Na")[0] == pytest.approx(5.64 / np.sqrt(2), abs=0.02)
    np.testing.assert_allclose(result.g["Na-Cl"], result.g["Cl-Na"])  # equal numbers of Na and Cl
    assert result.n["Na-Cl"][np.searchsorted(result.r, 3.5)] == 6


def test_rdf_npt_frames_are_each_normalised_with_their_own_volume():
    # one crystal at two volumes (as in an NPT run): each frame's shell holds 12 neighbours
    small = bulk("Cu", "fcc", a=3.55, cubic=True).repeat(3)
    large = bulk("Cu", "fcc", a=3.70, cubic=True).repeat(3)
    result = rdf([small, large], ["Cu-Cu"], rmax=5.0, bins=500)
    peaks = result.r[result.g["Cu-Cu"] > 0]
    assert peaks.min() == pytest.approx(3.55 / np.sqrt(2), abs=0.01)
    assert result.n["Cu-Cu"][np.searchsorted(result.r, 2.95)] == 12
    # the average counts each frame with weight 1/2
    assert result.n["Cu-Cu"][np.searchsorted(result.r, 2.58)] == pytest.approx(6.0)


def test_rdf_errors():
    crystal = bulk("Si", "diamond", a=5.43, cubic=True)
    with pytest.raises(ValueError, match="3D-periodic"):
        rdf(molecule("H2O"), ["O-H"], rmax=2.0)
    with pytest.raises(ValueError, match=r"half the smallest cell width, 2\.7150"):
        rdf(crystal, ["Si-Si"], rmax=3.0)
    with pytest.raises(ValueError, match="two Si atoms"):
        rdf(bulk("Si", "sc", a=5.0, cubic=True), ["Si-Si"], rmax=2.0)
    with pytest.raises(ValueError, match="Si and O atoms"):
        rdf(crystal, ["Si-O"], rmax=2.0)
    with pytest.raises(ValueError, match="unknown element 'Xx'"):
        rdf(crystal, ["Si-Xx"], rmax=2.0)
    with pytest.raises(ValueError, match="no frames"):
        rdf([], ["Si-Si"])
    with pytest.raises(ValueError, match="no pairs"):
        rdf(crystal, [])


def test_parse_species():
    assert parse_species("O-H", 2) == ("O", "H")
    assert parse_species(" O - O - O ", 3) == ("O", "O", "O")
    assert parse_species(("Si", "Si"), 2) == ("Si", "Si")
    with pytest.raises(ValueError, match="expected 3 element symbols"):
        parse_species("O-O", 3)
    with pytest.raises(ValueError, match="unknown element 'o'"):
        parse_species("o-H", 2)


# --- angular distribution --------------------------------------------------

# first-shell angles and their number per centre atom
CRYSTAL_ANGLES = {
    "fcc-Cu": {60.0: 24, 90.0: 12, 120.0: 24, 180.0: 6},
    "bcc-Fe": {np.degrees(np.arccos(1 / 3)): 12, np.degrees(np.arccos(-1 / 3)): 12, 180.0: 4},
    "diamond-Si": {np.degrees(np.arccos(-1 / 3)): 6},  # tetrahedral angle 109.47
}


@pytest.mark.parametrize("name", list(CRYSTALS))
@pytest.mark.parametrize("supercell", [1, 3], ids=["primitive", "supercell"])
def test_crystal_adf_has_exactly_the_first_shell_angles(name, supercell):
    build, r1, r2, cn = CRYSTALS[name]
    atoms = build().repeat(supercell)
    symbol = atoms[0].symbol
    result = adf(atoms, f"{symbol}-{symbol}-{symbol}", cutoff=0.5 * (r1 + r2), bins=360)
    expected = CRYSTAL_ANGLES[name]
    per_centre = sum(expected.values())
    assert per_centre == cn * (cn - 1) // 2
    assert result.triplets_per_centre == pytest.approx(per_centre)
    assert result.counts.sum() == per_centre * len(atoms)
    for angle, count in expected.items():
        near = np.abs(result.angles - angle) < 1.0
        assert result.counts[near].sum() == count * len(atoms), angle
    assert np.sum(result.density) * (result.angles[1] - result.angles[0]) == pytest.approx(1.0)
    peaks = result.peaks()
    assert len(peaks) == len(expected)
    np.testing.assert_allclose(np.sort(peaks), sorted(expected), atol=0.5)


def test_adf_of_a_molecule_and_of_mixed_triplets():
    water = molecule("H2O")
    result = adf(water, "H-O-H", cutoff=1.2, bins=1800)
    assert result.counts.sum() == 1 and result.triplets_per_centre == 1
    assert result.angles[np.argmax(result.counts)] == pytest.approx(water.get_angle(1, 0, 2), abs=0.05)
    # rocksalt: Cl-Na-Cl at Na has 6 octahedral neighbours, 12 at 90 and 3 at 180 degrees
    salt = bulk("NaCl", "rocksalt", a=5.64)
    result = adf(salt, "Cl-Na-Cl", cutoff=3.2, bins=180)
    assert result.counts.sum() == 15
    assert result.counts[np.abs(result.angles - 90) < 1].sum() == 12
    assert result.counts[np.abs(result.angles - 180) < 1].sum() == 3
    # Na-Cl-Cl around Cl: A=Na, C=Cl neighbours of Cl within 3.2 A: 6 Na and no Cl -> no triplets
    assert adf(salt, "Na-Cl-Cl", cutoff=3.2).counts.sum() == 0
    with pytest.raises(ValueError, match="no K atoms"):
        adf(salt, "Na-K-Cl", cutoff=3.2)
    with pytest.raises(ValueError, match="cutoff must be > 0"):
        adf(salt, "Na-Cl-Na", cutoff=0)


# --- coordination ----------------------------------------------------------


@pytest.mark.parametrize("name", list(CRYSTALS))
def test_crystal_coordination_numbers(name):
    build, r1, r2, cn = CRYSTALS[name]
    symbol = build()[0].symbol
    for atoms in (build(), build().repeat((2, 3, 1))):  # primitive cell: neighbours are periodic images
        result = coordination([atoms, atoms], f"{symbol}-{symbol}", cutoff=0.5 * (r1 + r2))
        assert result.mean == cn
        assert result.values.tolist() == list(range(cn + 1))
        assert result.counts[cn] == 2 * len(atoms) and result.counts[:cn].sum() == 0
        assert result.fraction[cn] == 1.0


def test_coordination_of_two_species_and_a_distorted_frame():
    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    assert coordination(salt, "Na-Cl", 3.2).mean == 6
    assert coordination(salt, "Na-Na", 4.2).mean == 12
    assert coordination(salt, "Na-Na", 3.2).mean == 0
    # stretch one Si-Si bond of diamond past the cutoff: two atoms drop to 3
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    pairs = np.argwhere((si.get_all_distances(mic=True) < 2.4) & (si.get_all_distances(mic=True) > 0))
    i, j = pairs[0]
    si.set_distance(i, j, 2.9, fix=0.5, mic=True)
    result = coordination(si, "Si-Si", 2.6)
    assert result.counts.tolist() == [0, 0, 0, 2, 6]
    assert result.mean == pytest.approx((2 * 3 + 6 * 4) / 8)
    with pytest.raises(ValueError, match="no O atoms"):
        coordination(si, "O-Si", 2.6)


# --- writers and command line ----------------------------------------------


def test_csv_and_png_writers(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)
    atoms.rattle(0.05, seed=2)
    g = rdf(atoms, ["Cu-Cu"], bins=50)
    header, data = read_csv(g.to_csv(tmp_path / "rdf.csv"))
    assert header == ["r_A", "g_Cu-Cu", "n_Cu-Cu"]
    np.testing.assert_allclose(data[:, 0], g.r, rtol=1e-7)
    np.testing.assert_allclose(data[:, 1], g.g["Cu-Cu"], rtol=1e-7, atol=1e-12)
    a = adf(atoms, "Cu-Cu-Cu", 3.0, bins=90)
    header, data = read_csv(a.to_csv(tmp_path / "adf.csv"))
    assert header == ["angle_deg", "density_per_deg", "count"] and data[:, 2].sum() == 66 * len(atoms)
    c = coordination(atoms, "Cu-Cu", 3.0)
    header, data = read_csv(c.to_csv(tmp_path / "cn.csv"))
    assert header == ["coordination", "count", "fraction"] and data[-1].tolist() == [12, 108, 1.0]
    for result, name in ((g, "rdf.png"), (a, "adf.png"), (c, "cn.png")):
        path = result.plot(tmp_path / "plots" / name)
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


@pytest.fixture
def svg_backend():
    """The user's backend is svg for the test, restored after it."""
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    yield "svg"
    matplotlib.use(before)


def test_plotting_functions_leave_the_backend_alone(svg_backend, tmp_path):
    rng = np.random.default_rng(0)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    volumes = np.linspace(10.0, 14.0, 7)
    eos = EOSResult(volumes, 0.05 * (volumes - 12.0) ** 2 - 3.0, np.ones(7, bool), n_atoms=1)
    ref = rng.normal(size=50)
    row = {"method": "heads", "selection": "random", "fraction": 0.1, "seed": 0, "n_high": 10, "status": "done",
           "energy_mae": 5.0, "forces_mae": ""}
    plots = {
        "rdf": lambda p: rdf(atoms, ["Cu-Cu"], bins=20).plot(p),
        "adf": lambda p: adf(atoms, "Cu-Cu-Cu", 3.0).plot(p),
        "coordination": lambda p: coordination(atoms, "Cu-Cu", 3.0).plot(p),
        "eos": lambda p: plot_eos(fit_eos(eos, ["birchmurnaghan"]), p),
        "parity": lambda p: parity_plot({"PBE": {"energy": (ref + 0.01, ref), "forces": (ref, ref)}}, p),
        "learning_curve": lambda p: learning_curve([row], p, "study"),
        "selection": lambda p: plot_selection(sample(rng.normal(size=(40, 4)), 8, seed=0), p),
    }
    for name, plot in plots.items():
        path = plot(tmp_path / f"{name}.png")
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert matplotlib.get_backend() == svg_backend, f"{name} switched the backend"


def test_cli_analysis_commands(tmp_path, capsys):
    frames = []
    for seed in range(4):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
        atoms.rattle(0.03, seed=seed)
        frames.append(atoms)
    traj = tmp_path / "frames.traj"
    ase.io.write(traj, frames)
    out = tmp_path / "analysis"

    assert main(["rdf", str(traj), "--pairs", "Si-Si", "--bins", "100", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "RDF over 4 frames, rmax 5.43 A, 100 bins" in text and "Si-Si: first peak at 2.3" in text
    header, data = read_csv(out / "rdf_Si-Si.csv")
    assert header == ["r_A", "g_Si-Si", "n_Si-Si"] and data.shape == (100, 3)
    assert (out / "rdf_Si-Si.png").read_bytes()[:8] == PNG_MAGIC

    assert main(["adf", str(traj), "--triplet", "Si-Si-Si", "--cutoff", "2.8", "--index", "1:", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "over 3 frames" in text and "6.000 per Si atom" in text and "peaks (degrees): [109" in text
    assert (out / "adf_Si-Si-Si.csv").is_file() and (out / "adf_Si-Si-Si.png").is_file()

    assert main(["coordination", str(traj), "--pair", "Si-Si", "--cutoff", "2.8", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mean 4.0000" in text and "4: 100.00% (256)" in text
    assert (out / "coordination_Si-Si.csv").is_file()

    # errors become exit status 2 with a message
    assert main(["rdf", str(traj), "--pairs", "Si-O", "-o", str(out)]) == 2
    assert "the Si-O RDF needs Si and O atoms" in capsys.readouterr().err
    assert main(["coordination", str(tmp_path / "absent.traj"), "--pair", "Si-Si", "--cutoff", "2"]) == 2
    assert "absent.traj not found" in capsys.readouterr().err
