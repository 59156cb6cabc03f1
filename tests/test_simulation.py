import json
import os
import subprocess
import sys
import time

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.eos import calculate_eos
from ase.units import GPa, kB

from mfmlip import MFCalculator
from mfmlip.cli.main import main
from mfmlip.model import MFPotential, ModelSpec, save_model
from mfmlip import atomic_io
from mfmlip.simulation import md as md_module
from mfmlip.simulation.eos import equation_of_state
from mfmlip.simulation.md import LOG_COLUMNS, MDSettings, load_checkpoint, read_log, run_md
from mfmlip.simulation.relax import max_force, relax

# ASE's own reference for Cu with EMT: the calculate_eos doctest gives a = 3.589825 A
EMT_CU_A0 = 3.589825
EMT_CU_V0 = EMT_CU_A0**3 / 4  # A^3/atom, fcc has 4 atoms per cubic cell
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cu(a=3.6, repeat=2):
    return bulk("Cu", "fcc", a=a, cubic=True).repeat(repeat)


def pressure_GPa(atoms):
    return -np.trace(atoms.get_stress(voigt=False)) / 3 / GPa


# --- relaxation -------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["LBFGS", "FIRE"])
def test_relax_positions_converges_under_fmax(optimizer, tmp_path):
    atoms = cu()
    atoms.rattle(0.1, seed=4)
    start = atoms.copy()
    start.calc = EMT()
    relaxed, converged = relax(atoms, EMT(), fmax=0.005, optimizer=optimizer, trajectory=tmp_path / "r.traj")
    assert converged
    assert max_force(relaxed) < 0.005 < max_force(start)
    assert relaxed.get_potential_energy() < start.get_potential_energy() - 0.1
    # fcc is the minimum: relaxation undoes the rattle (up to a rigid shift)
    ideal = cu()
    ideal.calc = EMT()
    assert relaxed.get_potential_energy() == pytest.approx(ideal.get_potential_energy(), abs=1e-4)
    np.testing.assert_array_equal(atoms.positions, start.positions)  # input untouched
    np.testing.assert_array_equal(relaxed.cell, atoms.cell)  # fixed cell
    frames = ase.io.read(tmp_path / "r.traj", ":")
    assert len(frames) >= 3
    np.testing.assert_allclose(frames[0].positions, start.positions)
    np.testing.assert_allclose(frames[-1].positions, relaxed.positions)


def test_cell_relaxation_reaches_the_emt_lattice_constant_and_target_pressure(tmp_path):
    atoms = cu(a=3.75)
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.03, 0.0], [0.0, 1.0, -0.02], [0.0, 0.0, 0.98]]),
                   scale_atoms=True)  # strained and sheared
    atoms.rattle(0.05, seed=1)
    relaxed, converged = relax(atoms, EMT(), fmax=1e-4, cell=True, trajectory=tmp_path / "cell.traj")
    assert converged
    assert relaxed.get_volume() / len(relaxed) == pytest.approx(EMT_CU_V0, rel=1e-4)
    np.testing.assert_allclose(np.sort(relaxed.cell.lengths()), [2 * EMT_CU_A0] * 3, rtol=1e-4)
    np.testing.assert_allclose(relaxed.cell.angles(), [90.0] * 3, atol=0.01)
    assert np.abs(relaxed.get_stress()).max() / GPa < 0.05
    volumes = [f.get_volume() for f in ase.io.read(tmp_path / "cell.traj", ":")]
    assert volumes[0] == pytest.approx(atoms.get_volume()) and volumes[-1] == pytest.approx(relaxed.get_volume())

    # under 5 GPa the cell shrinks until the internal pressure balances it
    squeezed, converged = relax(cu(), EMT(), fmax=1e-4, cell=True, pressure_GPa=5.0)
    assert converged
    assert pressure_GPa(squeezed) == pytest.approx(5.0, abs=0.05)
    assert squeezed.get_volume() / len(squeezed) < EMT_CU_V0 * 0.97


def test_relax_errors():
    with pytest.raises(ValueError, match="3D-periodic"):
        relax(molecule("H2O"), EMT(), cell=True)
    with pytest.raises(ValueError, match="unknown optimizer 'BFGS'"):
        relax(cu(), EMT(), optimizer="BFGS")
    with pytest.raises(ValueError, match="fmax must be > 0"):
        relax(cu(), EMT(), fmax=0)
    atoms = cu()
    atoms.rattle(0.1, seed=0)
    _, converged = relax(atoms, EMT(), fmax=1e-6, steps=2)
    assert not converged


# --- equation of state ------------------------------------------------------


def test_eos_of_emt_copper_matches_ase_reference(tmp_path):
    result = equation_of_state(bulk("Cu", "fcc", a=3.6), EMT(), points=9, volume_range=(0.94, 1.06),
                               plot=tmp_path / "eos.png")
    assert set(result.fits) == {"murnaghan", "birchmurnaghan"}
    assert result.volumes.shape == result.energies.shape == (9,) and result.converged.all()
    assert result.volumes[[0, -1]] == pytest.approx(np.array([0.94, 1.06]) * 3.6**3 / 4)
    # ASE's own route: calculate_eos (volume-spaced, SJ EOS) on the same cell
    atoms = bulk("Cu", "fcc", a=3.6)
    atoms.calc = EMT()
    v_ase, _, b_ase = calculate_eos(atoms, npoints=9, eps=0.06).fit()
    at_a0 = bulk("Cu", "fcc", a=EMT_CU_A0)
    at_a0.calc = EMT()
    for name, fit in result.fits.items():
        assert fit["V0"] == pytest.approx(EMT_CU_V0, rel=2e-4), name
        assert fit["V0"] == pytest.approx(v_ase, rel=2e-4), name
        assert fit["B"] == pytest.approx(b_ase / GPa, rel=0.01), name  # 134.4 GPa
        assert 130 < fit["B"] < 139
        assert fit["E0"] == pytest.approx(at_a0.get_potential_energy(), abs=1e-5)
    assert "murnaghan" in result.table() and "B (GPa)" in result.table()
    assert (tmp_path / "eos.png").read_bytes()[:8] == PNG_MAGIC


def test_eos_relaxes_positions_at_each_volume():
    # a rattled 32-atom cell: relaxing positions at every volume recovers the fcc curve
    rattled = cu(a=3.6)
    rattled.rattle(0.05, seed=7)
    result = equation_of_state(rattled, EMT(), points=5, volume_range=(0.95, 1.05), fmax=1e-3)
    assert result.converged.all() and result.n_atoms == 32
    reference = equation_of_state(bulk("Cu", "fcc", a=3.6), EMT(), points=5, volume_range=(0.95, 1.05))
    np.testing.assert_allclose(result.volumes, reference.volumes, rtol=1e-12)
    np.testing.assert_allclose(result.energies, reference.energies, atol=1e-5)
    assert result.fits["birchmurnaghan"]["V0"] == pytest.approx(EMT_CU_V0, rel=1e-3)
    unrelaxed = equation_of_state(rattled, EMT(), points=5, volume_range=(0.95, 1.05), relax_steps=0)
    assert np.all(unrelaxed.energies > reference.energies + 1e-3)


def test_eos_errors():
    with pytest.raises(ValueError, match="at least 5 points"):
        equation_of_state(bulk("Cu"), EMT(), points=4)
    with pytest.raises(ValueError, match="3D-periodic"):
        equation_of_state(molecule("H2O"), EMT())
    with pytest.raises(ValueError, match="volume_range"):
        equation_of_state(bulk("Cu"), EMT(), volume_range=(1.1, 0.9))
    with pytest.raises(ValueError, match="unknown EOS 'cubic'"):
        equation_of_state(bulk("Cu"), EMT(), eos=["cubic"])
    with pytest.raises(ValueError, match="outside the sampled volumes"):
        equation_of_state(bulk("Cu", a=3.6), EMT(), volume_range=(1.2, 1.4))


# --- molecular dynamics -----------------------------------------------------

ENSEMBLES = {
    "nve": dict(ensemble="nve", temperature_K=300),
    "nvt-langevin": dict(ensemble="nvt", temperature_K=300),
    "nvt-nose-hoover": dict(ensemble="nvt", temperature_K=300, thermostat="nose-hoover"),
    "npt-mtk": dict(ensemble="npt", temperature_K=300, pressure_GPa=1.0),
    "npt-berendsen": dict(ensemble="npt", temperature_K=300, pressure_GPa=1.0, barostat="berendsen"),
}


def md_files(folder, name="md"):
    return dict(logfile=folder / f"{name}.csv", trajectory=folder / f"{name}.traj",
                checkpoint=folder / f"{name}.json")


@pytest.mark.parametrize("name", list(ENSEMBLES))
def test_md_runs_and_logs_every_ensemble(name, tmp_path):
    options = ENSEMBLES[name]
    atoms = cu()
    settings = MDSettings(timestep_fs=1.0, steps=20, log_interval=5, trajectory_interval=10, checkpoint_interval=10,
                          seed=1, **options)
    result = run_md(atoms, EMT(), settings, progress=False, **md_files(tmp_path))
    assert (result.steps, result.steps_run, result.resumed_from) == (20, 20, None)
    with open(tmp_path / "md.csv") as fh:
        assert fh.readline().strip() == ",".join(LOG_COLUMNS)
    log = read_log(tmp_path / "md.csv")
    assert log["step"].tolist() == [0, 5, 10, 15, 20]
    np.testing.assert_allclose(log["time_ps"], log["step"] * 1.0e-3)
    np.testing.assert_allclose(log["etot_eV"], log["epot_eV"] + log["ekin_eV"], atol=1e-8)
    # temperature from the kinetic energy: Langevin holds the centre of mass (FixCom, 3N-3 dof)
    dof = 3 * len(atoms) - (3 if name == "nvt-langevin" else 0)
    np.testing.assert_allclose(log["temperature_K"], 2 * log["ekin_eV"] / (dof * kB), rtol=1e-8)
    assert 150 < log["temperature_K"][0] < 450  # Maxwell-Boltzmann at 300 K, 32 atoms
    assert np.all(np.isfinite(log["pressure_GPa"]))
    if options["ensemble"] == "npt":
        assert np.ptp(log["volume_A3"]) > 1e-3
    else:
        np.testing.assert_allclose(log["volume_A3"], atoms.get_volume())
    frames = ase.io.read(tmp_path / "md.traj", ":")
    assert [f.info["step"] for f in frames] == [0, 10, 20]
    np.testing.assert_allclose(frames[-1].positions, result.atoms.positions)
    np.testing.assert_allclose(frames[-1].get_momenta(), result.atoms.get_momenta())
    state = load_checkpoint(tmp_path / "md.json")
    assert state["step"] == 20 and state["n_frames"] == 3
    np.testing.assert_array_equal(state["atoms"].positions, result.atoms.positions)
    np.testing.assert_array_equal(state["atoms"].get_momenta(), result.atoms.get_momenta())
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind
    assert not atoms.has("momenta")  # the input is not modified


def test_nve_conserves_energy_with_emt(tmp_path):
    settings = MDSettings("nve", temperature_K=300, timestep_fs=1.0, steps=300, log_interval=5, seed=2)
    result = run_md(cu(), EMT(), settings, logfile=tmp_path / "nve.csv", progress=False)
    log = read_log(result.log)
    n = len(result.atoms)
    drift = np.abs(log["etot_eV"] - log["etot_eV"][0]).max() / n
    assert drift < 5e-5  # eV/atom over 300 fs (observed ~1e-5)
    assert np.ptp(log["ekin_eV"]) / n > 200 * drift  # while energy flows between kinetic and potential
    # the lattice starts perfect: equipartition halves the initial temperature
    assert np.mean(log["temperature_K"][20:]) == pytest.approx(log["temperature_K"][0] / 2, rel=0.3)
    # Stationary: no centre-of-mass drift
    assert np.abs(result.atoms.get_momenta().sum(axis=0)).max() < 1e-10


@pytest.mark.parametrize("barostat", ["mtk", "berendsen"])
def test_npt_compresses_to_the_target_pressure(barostat, tmp_path):
    options = dict(pdamp_fs=50) if barostat == "mtk" else dict(pdamp_fs=100, compressibility_per_GPa=0.0075)
    start = cu()
    settings = MDSettings("npt", temperature_K=300, pressure_GPa=10.0, timestep_fs=2.0, steps=150, log_interval=5,
                          barostat=barostat, **options)
    result = run_md(start, EMT(), settings, logfile=tmp_path / "npt.csv", progress=False)
    log = read_log(result.log)
    late = log["step"] >= 75
    # EMT Cu, B ~ 134 GPa: 10 GPa squeezes the volume by ~6%
    assert np.mean(log["volume_A3"][late]) < 0.97 * start.get_volume()
    assert np.mean(log["pressure_GPa"][late]) == pytest.approx(10.0, abs=3.0)
    np.testing.assert_allclose(result.atoms.cell.angles(), [90.0] * 3, atol=1e-8)  # isotropic: shape kept


@pytest.mark.parametrize("name", ["nve", "nvt-langevin", "nvt-nose-hoover", "npt-mtk"])
def test_resumed_run_equals_an_uninterrupted_one(name, tmp_path):
    options = dict(ENSEMBLES[name], timestep_fs=1.0, log_interval=3, trajectory_interval=5, checkpoint_interval=4,
                   seed=7)
    full = run_md(cu(), EMT(), MDSettings(steps=30, **options), progress=False, **md_files(tmp_path, "full"))
    first = run_md(cu(), EMT(), MDSettings(steps=12, **options), progress=False, **md_files(tmp_path, "part"))
    assert first.steps == 12
    second = run_md(cu(), EMT(), MDSettings(steps=30, **options), resume=True, progress=False,
                    **md_files(tmp_path, "part"))
    assert (second.steps, second.steps_run, second.resumed_from) == (30, 18, 12)
    np.testing.assert_allclose(second.atoms.positions, full.atoms.positions, rtol=0, atol=1e-10)
    np.testing.assert_allclose(second.atoms.get_momenta(), full.atoms.get_momenta(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(second.atoms.cell, full.atoms.cell, rtol=0, atol=1e-10)
    log_full, log_part = read_log(tmp_path / "full.csv"), read_log(tmp_path / "part.csv")
    assert log_part["step"].tolist() == log_full["step"].tolist() == list(range(0, 31, 3))
    np.testing.assert_allclose(log_part["etot_eV"], log_full["etot_eV"], atol=1e-9)
    frames = ase.io.read(tmp_path / "part.traj", ":")
    assert [f.info["step"] for f in frames] == [0, 5, 10, 15, 20, 25, 30]
    # running again asks for nothing new
    again = run_md(cu(), EMT(), MDSettings(steps=30, **options), resume=True, progress=False,
                   **md_files(tmp_path, "part"))
    assert (again.steps, again.steps_run) == (30, 0)
    assert read_log(tmp_path / "part.csv")["step"].tolist() == log_full["step"].tolist()


class CrashingEMT(EMT):
    """EMT that dies (like a killed job) on its n-th calculation."""

    def __init__(self, crash_at):
        super().__init__()
        self.calls, self.crash_at = 0, crash_at

    def calculate(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.crash_at:
            raise KeyboardInterrupt("simulated kill")
        super().calculate(*args, **kwargs)


def test_crashed_run_resumes_from_its_checkpoint_without_repeating_steps(tmp_path):
    settings = MDSettings("nvt", temperature_K=500, timestep_fs=1.0, steps=40, log_interval=1, trajectory_interval=2,
                          checkpoint_interval=10, seed=5)
    reference = run_md(cu(), EMT(), settings, progress=False, **md_files(tmp_path, "ref"))
    with pytest.raises(KeyboardInterrupt):
        run_md(cu(), CrashingEMT(crash_at=27), settings, progress=False, **md_files(tmp_path))
    checkpoint_step = load_checkpoint(tmp_path / "md.json")["step"]
    logged = read_log(tmp_path / "md.csv")["step"]
    framed = [f.info["step"] for f in ase.io.read(tmp_path / "md.traj", ":")]
    # the crash came after the last checkpoint: log rows and frames beyond it exist
    assert checkpoint_step % 10 == 0 and 0 < checkpoint_step < logged.max() < 40
    assert max(framed) > checkpoint_step

    result = run_md(cu(), EMT(), settings, resume=True, progress=False, **md_files(tmp_path))
    assert (result.resumed_from, result.steps_run, result.steps) == (checkpoint_step, 40 - checkpoint_step, 40)
    log = read_log(tmp_path / "md.csv")
    assert log["step"].tolist() == list(range(41))  # every step exactly once
    assert [f.info["step"] for f in ase.io.read(tmp_path / "md.traj", ":")] == list(range(0, 41, 2))
    # Langevin noise continues from the saved generator state: same run as without the crash
    np.testing.assert_allclose(result.atoms.positions, reference.atoms.positions, rtol=0, atol=1e-10)
    np.testing.assert_allclose(log["etot_eV"], read_log(tmp_path / "ref.csv")["etot_eV"], atol=1e-9)


def test_killed_process_resumes(tmp_path):
    folder = str(tmp_path)
    script = f"""
from ase.build import bulk
from ase.calculators.emt import EMT
from mfmlip.simulation.md import MDSettings, run_md
run_md(bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2), EMT(),
       MDSettings("nvt", temperature_K=300, timestep_fs=1.0, steps=10**7, log_interval=1, trajectory_interval=7,
                  checkpoint_interval=25, seed=3),
       logfile="{folder}/md.csv", trajectory="{folder}/md.traj", checkpoint="{folder}/md.json", progress=False)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "md.json").is_file() and load_checkpoint(tmp_path / "md.json")["step"] >= 50:
                break
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup in the child
        proc.wait()
    assert proc.returncode == -9, "the MD process ended before it was killed"
    checkpoint_step = load_checkpoint(tmp_path / "md.json")["step"]
    assert checkpoint_step >= 50 and checkpoint_step % 25 == 0
    target = checkpoint_step + 30
    settings = MDSettings("nvt", temperature_K=300, timestep_fs=1.0, steps=target, log_interval=1,
                          trajectory_interval=7, checkpoint_interval=25, seed=3)
    result = run_md(cu(), EMT(), settings, resume=True, progress=False, **md_files(tmp_path))
    assert result.resumed_from == checkpoint_step and result.steps == target
    assert read_log(tmp_path / "md.csv")["step"].tolist() == list(range(target + 1))
    assert [f.info["step"] for f in ase.io.read(tmp_path / "md.traj", ":")] == list(range(0, target + 1, 7))


def test_resume_edge_cases(tmp_path, capsys):
    options = dict(ensemble="nvt", temperature_K=300, timestep_fs=1.0)
    files = dict(progress=False, **md_files(tmp_path))
    # no checkpoint yet: a new run, said so
    result = run_md(cu(), EMT(), MDSettings(steps=5, **options), resume=True, **files)
    assert result.resumed_from is None and result.steps == 5
    assert "no checkpoint" in capsys.readouterr().out
    with pytest.raises(ValueError, match="timestep_fs=1.0, now 2.0"):
        run_md(cu(), EMT(), MDSettings(steps=10, **dict(options, timestep_fs=2.0)), resume=True, **files)
    with pytest.raises(ValueError, match="method='langevin', now 'nose-hoover'"):
        run_md(cu(), EMT(), MDSettings(steps=10, thermostat="nose-hoover", **options), resume=True, **files)
    with pytest.raises(ValueError, match="holds Cu32, not the given structure Cu4"):
        run_md(cu(repeat=1), EMT(), MDSettings(steps=10, **options), resume=True, **files)
    # without resume the old run is replaced
    result = run_md(cu(), EMT(), MDSettings(steps=3, **options), **files)
    assert result.steps == 3 and read_log(tmp_path / "md.csv")["step"].tolist() == [0, 3]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    files = md_files(tmp_path)
    run_md(cu(), EMT(), MDSettings("nve", temperature_K=100, steps=4), progress=False, **files)
    before = (tmp_path / "md.json").read_text()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        md_module.save_checkpoint(files["checkpoint"], cu(), 99, np.random.default_rng(0), {}, {}, 0)
    assert (tmp_path / "md.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["md.csv", "md.json", "md.traj"]
    (tmp_path / "other.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(ValueError, match="not an mfmlip MD checkpoint"):
        load_checkpoint(tmp_path / "other.json")


def test_md_errors():
    with pytest.raises(ValueError, match="nvt needs a temperature > 0 K"):
        run_md(cu(), EMT(), MDSettings("nvt", steps=1), progress=False)
    with pytest.raises(ValueError, match="unknown ensemble 'nph'"):
        run_md(cu(), EMT(), MDSettings("nph", temperature_K=300, steps=1), progress=False)
    with pytest.raises(ValueError, match="npt needs a 3D-periodic structure"):
        run_md(molecule("H2O"), EMT(), MDSettings("npt", temperature_K=300, steps=1), progress=False)
    with pytest.raises(ValueError, match="unknown barostat"):
        run_md(cu(), EMT(), MDSettings("npt", temperature_K=300, barostat="parrinello", steps=1), progress=False)
    with pytest.raises(ValueError, match="timestep must be > 0"):
        run_md(cu(), EMT(), MDSettings("nve", timestep_fs=0, steps=1), progress=False)
    with pytest.raises(TypeError, match="settings must be an MDSettings, got str"):
        run_md(cu(), EMT(), "nvt", progress=False)


# --- the command line, on a tiny model file --------------------------------


def tiny_si_model():
    """A tiny float64 Si model whose energy-volume curve at fidelity SCAN has a
    minimum inside a = 4-7 A, and the lattice constant there."""
    grid = np.linspace(4.0, 7.0, 13)
    for seed in range(10):
        torch.manual_seed(seed)
        spec = ModelSpec(species=[14], fidelities=["PBE", "SCAN"], cutoff=4.0, channels=8, lmax=1,
                         num_layers=1, avg_num_neighbors=10.0)
        model = MFPotential(spec).double().eval()
        calc = MFCalculator(model, fidelity="SCAN")
        energies = []
        for a in grid:
            atoms = bulk("Si", "diamond", a=a)
            atoms.calc = calc
            energies.append(atoms.get_potential_energy())
        k = int(np.argmin(energies))
        if 0 < k < len(grid) - 1:
            return model, grid[k]
    pytest.fail("no tiny model with an energy minimum found")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model, a_min = tiny_si_model()
    folder = tmp_path_factory.mktemp("model")
    save_model(model, folder / "model.pt")
    ase.io.write(folder / "si2.extxyz", bulk("Si", "diamond", a=a_min))
    rattled = bulk("Si", "diamond", a=a_min, cubic=True)
    rattled.rattle(0.1, seed=1)
    ase.io.write(folder / "si8.extxyz", rattled)
    return folder


def test_cli_relax(model_file, tmp_path, capsys):
    out = tmp_path / "relaxed.extxyz"
    args = ["relax", str(model_file / "model.pt"), str(model_file / "si8.extxyz"), "--fidelity", "SCAN",
            "--fmax", "0.005", "-o", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "energy:" in text and f"relaxed structure written to {out}" in text
    relaxed = ase.io.read(out)
    relaxed.calc = MFCalculator(model_file / "model.pt", fidelity="SCAN", dtype="float64")
    assert max_force(relaxed) < 0.005
    start = ase.io.read(model_file / "si8.extxyz")
    start.calc = relaxed.calc
    assert relaxed.get_potential_energy() < start.get_potential_energy()
    np.testing.assert_allclose(relaxed.cell, start.cell)
    frames = ase.io.read(tmp_path / "relaxed_trajectory.traj", ":")
    assert len(frames) >= 2 and frames[-1].get_potential_energy() == pytest.approx(relaxed.get_potential_energy())

    assert main(args[:-2] + ["--cell", "--optimizer", "FIRE", "-o", str(tmp_path / "cell.extxyz")]) == 0
    assert "volume" in capsys.readouterr().out
    cell_relaxed = ase.io.read(tmp_path / "cell.extxyz")
    assert not np.allclose(cell_relaxed.cell, start.cell)

    with pytest.raises(SystemExit) as exit_info:  # not converged: exit status 1
        main(args[:-2] + ["--fmax", "1e-6", "--steps", "2", "-o", str(tmp_path / "short.extxyz")])
    assert exit_info.value.code == 1
    assert "not converged within 2 steps" in capsys.readouterr().err


def test_cli_eos_matches_the_python_api(model_file, tmp_path, capsys):
    args = ["eos", str(model_file / "model.pt"), str(model_file / "si2.extxyz"), "--fidelity", "SCAN",
            "--points", "7", "--range", "0.85", "1.15", "-o", str(tmp_path)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "E0 (eV/atom)" in text and "V0 (A^3/atom)" in text and "B (GPa)" in text
    assert "murnaghan" in text and "birchmurnaghan" in text
    saved = json.loads((tmp_path / "eos.json").read_text())
    calc = MFCalculator(model_file / "model.pt", fidelity="SCAN", dtype="float64")
    expected = equation_of_state(ase.io.read(model_file / "si2.extxyz"), calc, points=7, volume_range=(0.85, 1.15))
    for name in ("murnaghan", "birchmurnaghan"):
        for key in ("E0", "V0", "B"):
            assert saved["fits"][name][key] == pytest.approx(expected.fits[name][key], rel=1e-6)
        assert f"{saved['fits'][name]['V0']:.4f}" in text
    assert saved["fits"]["murnaghan"]["B"] > 0
    rows = (tmp_path / "eos.csv").read_text().splitlines()
    assert rows[0] == "volume_A3_per_atom,energy_eV_per_atom,relax_converged" and len(rows) == 8
    assert (tmp_path / "eos.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_md_runs_and_resumes(model_file, tmp_path, capsys):
    base = ["md", str(model_file / "model.pt"), str(model_file / "si8.extxyz"), "--fidelity", "SCAN",
            "--timestep", "1.0", "--log-interval", "5", "--traj-interval", "5", "--checkpoint-interval", "10",
            "--no-progress", "-o", str(tmp_path / "nvt")]
    assert main(base + ["--ensemble", "nvt", "--temperature", "300", "--steps", "20"]) == 0
    assert "20 steps done (20 in this call)" in capsys.readouterr().out
    assert main(base + ["--ensemble", "nvt", "--temperature", "300", "--steps", "30", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "resumed from step 20" in text and "30 steps done (10 in this call), 0.03 ps" in text
    log = read_log(tmp_path / "nvt" / "md_log.csv")
    assert log["step"].tolist() == [0, 5, 10, 15, 20, 25, 30]
    assert np.all(np.isfinite(log["pressure_GPa"])) and np.all(log["temperature_K"] > 0)
    assert len(ase.io.read(tmp_path / "nvt" / "md.traj", ":")) == 7
    assert load_checkpoint(tmp_path / "nvt" / "checkpoint.json")["step"] == 30

    npt = base[:-1] + [str(tmp_path / "npt"), "--ensemble", "npt", "--temperature", "300", "--pressure", "2",
                       "--pdamp", "20", "--steps", "10"]
    assert main(npt) == 0
    assert np.ptp(read_log(tmp_path / "npt" / "md_log.csv")["volume_A3"]) > 0
    nve = base[:-1] + [str(tmp_path / "nve"), "--ensemble", "nve", "--temperature", "100", "--steps", "10"]
    assert main(nve) == 0
    log = read_log(tmp_path / "nve" / "md_log.csv")
    assert np.abs(log["etot_eV"] - log["etot_eV"][0]).max() < 1e-3
    capsys.readouterr()
    assert main(base + ["--ensemble", "nvt", "--steps", "5"]) == 2  # nvt without a temperature
    assert "nvt needs a temperature > 0 K" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["relax"], ["eos"], ["md", "--ensemble", "nvt", "--temperature", "300", "--steps", "2"],
])
def test_cli_unknown_fidelity_lists_the_models_fidelities(command, model_file, tmp_path, capsys):
    args = [command[0], str(model_file / "model.pt"), str(model_file / "si2.extxyz"), "--fidelity", "MP2",
            *command[1:], "-o", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"mfmlip {command[0]}: error" in err and "'MP2'" in err and "['PBE', 'SCAN']" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_requires_fidelity(model_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["relax", str(model_file / "model.pt"), str(model_file / "si2.extxyz")])
    assert exit_info.value.code == 2
    assert "--fidelity" in capsys.readouterr().err


def test_cli_min_distance_refuses_closer_atoms(model_file, tmp_path, capsys):
    # Si-Si bonds of diamond are ~2.35 A: a 3 A threshold refuses the structure
    args = ["relax", str(model_file / "model.pt"), str(model_file / "si8.extxyz"), "--fidelity", "SCAN",
            "-o", str(tmp_path / "r.extxyz")]
    assert main(args + ["--min-distance", "3.0"]) == 2
    assert "closer than min_distance=3 A" in capsys.readouterr().err
    assert main(args) == 0
