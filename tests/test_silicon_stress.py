"""Stress labels stored as VASP's kBar stress (``stress_format: vasp_kbar``).

The mlearn silicon data carries VASP's stress in kBar, VASP's sign (compression
positive), order xx yy zz xy yz zx. mfmlip's stress is eV/Angstrom^3 with ASE's
sign. Checked here against fixed numbers, against ASE's own OUTCAR converter,
against the energies of the strained silicon cells of the data set, and in a
tiny training run.
"""

import itertools
import json

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.lj import LennardJones
from ase.stress import full_3x3_to_voigt_6_stress
from ase.units import GPa

from mfmlip.data.structures import DataError, read_structures, stress_from_vasp_kbar
from mfmlip.training.config import ConfigError, FileConfig, load_config
from mfmlip.training.data import read_entry
from mfmlip.training.run import read_metrics, train

from tiny_runs import tiny_config

KBAR = 6.2415091e-4  # 1 kBar = 0.1 GPa in eV/Angstrom^3 (ASE uses CODATA 2014; 1e-8 relative differences)


def ase_to_vasp_kbar(stress_3x3: np.ndarray) -> np.ndarray:
    """Inverse of the conversion under test, written out independently: VASP order, sign and unit."""
    s = -np.asarray(stress_3x3) / (0.1 * GPa)
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[0, 1], s[1, 2], s[2, 0]])


def test_vasp_kbar_to_ase_stress_known_values():
    # VASP "in kB" order: xx yy zz xy yz zx, compression positive
    out = stress_from_vasp_kbar([10.0, 20.0, 30.0, 1.0, 2.0, 3.0])
    expected = -KBAR * np.array([[10.0, 1.0, 3.0],
                                 [1.0, 20.0, 2.0],
                                 [3.0, 2.0, 30.0]])
    np.testing.assert_allclose(out, expected, rtol=1e-7)
    assert out[0, 0] == pytest.approx(-6.241509e-3, rel=1e-6)  # 10 kBar of compression: -1 GPa in ASE's sign
    assert out[0, 1] == out[1, 0] and out[1, 2] == out[2, 1] and out[0, 2] == out[2, 0]
    # a 3x3 (vasprun.xml) is only scaled and negated
    np.testing.assert_allclose(stress_from_vasp_kbar(np.eye(3) * 5.0), -5.0 * KBAR * np.eye(3), rtol=1e-7)


def test_vasp_kbar_conversion_agrees_with_ase_outcar_reader():
    vasp_parsers = pytest.importorskip("ase.io.vasp_parsers.vasp_outcar_parsers")  # part of ASE >= 3.22
    line = [-6.580947, -9.633655, -2.758973, 9.086826, -1.606189, -5.419485]  # frame 0 of mlearn's Si set
    ours = full_3x3_to_voigt_6_stress(stress_from_vasp_kbar(line))
    np.testing.assert_allclose(ours, vasp_parsers.convert_vasp_outcar_stress(line), rtol=1e-12)


def test_vasp_kbar_bad_shape_names_the_field():
    with pytest.raises(DataError, match=r"^f: frame 3, field 'v': expected VASP stress in kBar as 6 numbers"):
        stress_from_vasp_kbar(np.arange(5.0), "f: frame 3, field 'v'")


def test_stress_from_vasp_kbar_matches_energy_change_of_strained_silicon(data_file):
    """dE = V sigma : d(eps) between nearby strained cells of the mlearn set ("Elastic" frames).

    A wrong sign flips the prediction; the Voigt order xx yy zz yz zx xy in place of
    VASP's xx yy zz xy yz zx breaks the sheared pairs.
    """
    frames = [a for a in ase.io.read(data_file("silicon/PBE_training.extxyz"), ":")
              if a.info["config_type"] == "Elastic"]
    checked = sheared = 0
    for a, b in itertools.combinations(frames, 2):
        deformation = np.linalg.solve(a.cell.array, b.cell.array).T  # cell_b = cell_a @ F^T
        eps = 0.5 * (deformation + deformation.T) - np.eye(3)
        if len(a) != len(b) or np.abs(eps).max() > 0.02:
            continue
        work = 0.5 * sum(x.get_volume() * stress_from_vasp_kbar(x.info["virial_stress_kbar"]) for x in (a, b))
        predicted = float(np.sum(work * eps))  # trapezoid rule along the strain path, eV
        actual = b.get_potential_energy() - a.get_potential_energy()
        assert predicted == pytest.approx(actual, rel=0.03, abs=0.015), (a.cell, b.cell)
        checked += 1
        sheared += bool(np.abs(eps[np.triu_indices(3, 1)]).max() > 0.01)
    assert checked >= 20 and sheared >= 5


def test_read_structures_with_stress_format(tmp_path):
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.info.update(fidelity="PBE", virial_stress_kbar=np.array([10.0, 20.0, 30.0, 1.0, 2.0, 3.0]))
    path = tmp_path / "si.extxyz"
    ase.io.write(path, atoms, format="extxyz")
    (s,) = read_structures(path, stress_key="virial_stress_kbar", stress_format="vasp_kbar")
    np.testing.assert_allclose(s.stress, stress_from_vasp_kbar([10, 20, 30, 1, 2, 3]))
    (raw,) = read_structures(path, stress_key="virial_stress_kbar")  # "ase": the numbers as Voigt, unconverted
    assert raw.stress[0, 0] == 10.0 and raw.stress[1, 2] == 1.0
    with pytest.raises(ValueError, match="unknown stress_format 'kbar'"):
        read_structures(path, stress_key="virial_stress_kbar", stress_format="kbar")


def test_config_stress_format_default_and_validation(tmp_path):
    assert FileConfig(path="x.extxyz").stress_format == "ase"
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  files:\n    - path: x.extxyz\n      stress_format: kbar\n")
    with pytest.raises(ConfigError, match=r"data\.files\.0\.stress_format"):
        load_config(path)


def lj_silicon_frames(n: int, seed: int = 0):
    """Strained, rattled 2-atom diamond cells labelled by a smooth Lennard-Jones
    potential, the stress stored the mlearn way (VASP kBar in info)."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Si", "diamond", a=5.43)
        strain = rng.uniform(-0.04, 0.04, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.calc = LennardJones(sigma=2.1, epsilon=0.5, rc=4.5, smooth=True)
        energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
        atoms.calc = None
        atoms.arrays["forces"] = forces
        atoms.info.update(energy=energy, fidelity="PBE", virial_stress_kbar=ase_to_vasp_kbar(stress),
                          ase_stress=stress.ravel())
        frames.append(atoms)
    return frames


def test_config_with_vasp_kbar_stress_trains_on_stress(tmp_path):
    frames = lj_silicon_frames(24)
    ase.io.write(tmp_path / "si_lj.extxyz", frames, format="extxyz")
    entry = {"path": "si_lj.extxyz", "stress_key": "virial_stress_kbar", "stress_format": "vasp_kbar",
             "split": {"train": None, "val": 4, "test": 4}}
    config = tiny_config(tmp_path, "run", files=[entry], max_epochs=6,
                         weights={"energy": 1.0, "forces": 1.0, "stress": 2000.0})
    cfg = load_config(config)

    # the pipeline's labels are the calculator's own stress (eV/Angstrom^3, ASE sign)
    structures, _, _ = read_entry(cfg.data.files[0], cfg.data, tmp_path)
    for s, atoms in zip(structures, frames):
        np.testing.assert_allclose(s.stress, atoms.info["ase_stress"].reshape(3, 3), rtol=1e-9, atol=1e-12)

    train(cfg)
    rows = read_metrics(tmp_path / "run")
    stress_loss = [float(r["train_stress"]) for r in rows if r.get("train_stress")]
    assert len(stress_loss) >= 3 and all(np.isfinite(stress_loss)) and stress_loss[0] > 0
    assert np.mean(stress_loss[-2:]) < stress_loss[0]  # the stress term is trained down
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())["PBE"]
    assert metrics["stress_n"] == 4 * 9 and np.isfinite(metrics["stress_mae"])
