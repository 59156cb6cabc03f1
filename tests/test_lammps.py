"""LAMMPS through fix external (mfmlip.lammps) and the torch.export file (mfmlip.model.export):
both give MFCalculator's energies, forces and stress; LAMMPS's integrators conserve and
control what they should; bad input is refused before the run."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.io import read
from ase.io.lammpsdata import write_lammps_data

from conftest import rattled_si
from mfmlip import MFCalculator
from mfmlip.cli.main import main
from mfmlip.data.graph import atoms_to_batch
from mfmlip.data.structures import DataError
from mfmlip.lammps import MFFixExternal, open_lammps
from mfmlip.lammps.script import run_input
from mfmlip.model import save_model
from mfmlip.model.export import export_model, load_exported

NKTV2P = 1.6021765e6  # LAMMPS metal units: bar per eV/A^3
VOIGT = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))  # LAMMPS order xx yy zz xy xz yz
PRESSURES = ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz")


def sige():
    """The rattled triclinic Si cell of the other tests, doubled, with two Ge atoms."""
    atoms = rattled_si() * (2, 1, 1)
    atoms.symbols[[1, 6]] = "Ge"
    return atoms


def lammps_with(tmp_path, atoms, model, boundary="p p p", **fix_options):
    """LAMMPS with ``atoms`` from a data file (types by element in order) and the model's fix."""
    data = tmp_path / "start.data"
    species = sorted(set(atoms.get_chemical_symbols()), key=atoms.get_chemical_symbols().index)
    write_lammps_data(data, atoms, specorder=species, masses=True, units="metal", atom_style="atomic")
    lmp = open_lammps(log=None, screen=False)
    lmp.commands_string(f"units metal\natom_style atomic\nboundary {boundary}\nbox tilt large\nread_data {data}")
    fix = MFFixExternal(lmp, model, **fix_options)
    return lmp, fix, data


def lammps_results(lmp) -> dict:
    """Energy, forces (by atom ID), pressure tensor (bar), per-atom sums, after ``run 0``."""
    lmp.commands_string("compute pe_atom all pe/atom\ncompute w_atom all stress/atom NULL\n"
                        "compute pe_sum all reduce sum c_pe_atom\n"
                        "compute w_sum all reduce sum c_w_atom[1] c_w_atom[2] c_w_atom[3] c_w_atom[4] c_w_atom[5] "
                        "c_w_atom[6]\nthermo_style custom step pe c_pe_sum c_w_sum[*] " + " ".join(PRESSURES)
                        + "\nrun 0")
    order = np.argsort(lmp.numpy.extract_atom("id"))
    boxlo, boxhi, xy, yz, xz, _, _ = lmp.extract_box()
    return {"energy": lmp.get_thermo("pe"), "energy_sum": lmp.extract_compute("pe_sum", 0, 0),
            "forces": lmp.numpy.extract_atom("f")[order].copy(),
            "atomic_energy": lmp.numpy.extract_compute("pe_atom", 1, 1)[order].copy(),
            "pressure": np.array([lmp.get_thermo(k) for k in PRESSURES]),
            "virial_sum": lmp.numpy.extract_compute("w_sum", 0, 1).copy(),
            "volume": float(np.prod(np.subtract(boxhi, boxlo)))}


def test_periodic_triclinic_cell_equals_calculator(tmp_path, make_model):
    model = make_model(species=(14, 32))
    lmp, fix, data = lammps_with(tmp_path, sige(), model, fidelity="SCAN")  # elements from the masses
    assert fix.elements == ["Si", "Ge"]
    got = lammps_results(lmp)
    lmp.close()
    atoms = read(data, format="lammps-data", atom_style="atomic", units="metal")  # LAMMPS's orientation
    atoms.pbc = True
    atoms.calc = MFCalculator(model, fidelity="SCAN")
    assert abs(atoms.cell[0, 1]) + abs(atoms.cell[1, 0]) > 0.5 and atoms.cell[1, 0] != 0  # really triclinic
    assert got["energy"] == pytest.approx(atoms.get_potential_energy(), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(got["forces"], atoms.get_forces(), atol=1e-12)
    stress = atoms.get_stress(voigt=False)
    virial = -atoms.get_volume() * np.array([stress[a, b] for a, b in VOIGT])  # eV
    # run 0 without velocities: the pressure is the virial's alone
    np.testing.assert_allclose(got["pressure"] * got["volume"] / NKTV2P, virial, rtol=1e-10, atol=1e-10)
    # per-atom energies and virials (compute pe/atom, stress/atom) sum to the totals
    np.testing.assert_allclose(got["atomic_energy"], atoms.get_potential_energies(), atol=1e-12)
    assert got["energy_sum"] == pytest.approx(got["energy"], abs=1e-10)
    np.testing.assert_allclose(-got["virial_sum"] / NKTV2P, virial, rtol=1e-10, atol=1e-10)
    assert np.ptp(got["atomic_energy"]) > 1e-6  # the per-atom split is not uniform


def test_shrink_wrapped_molecule_equals_calculator(tmp_path, make_model, ethanol):
    model = make_model(species=(1, 6, 8))
    ethanol.center(vacuum=4.0)
    lmp, _, _ = lammps_with(tmp_path, ethanol, model, boundary="s s s", fidelity="PBE", elements=["C", "O", "H"])
    got = lammps_results(lmp)
    positions = lmp.numpy.extract_atom("x")[np.argsort(lmp.numpy.extract_atom("id"))].copy()
    lmp.close()
    ethanol.calc = MFCalculator(model, fidelity="PBE")
    assert got["energy"] == pytest.approx(ethanol.get_potential_energy(), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(got["forces"], ethanol.get_forces(), atol=1e-12)
    # a molecule's virial is sum_i r_i (x) F_i; LAMMPS divides it by its shrink-wrapped box volume
    virial = np.einsum("ia,ib->ab", positions, got["forces"])
    np.testing.assert_allclose(got["pressure"] * got["volume"] / NKTV2P, [virial[a, b] for a, b in VOIGT],
                               rtol=1e-9, atol=1e-10)


def test_nve_conserves_energy_and_input_loops_work(tmp_path, make_model):
    """LAMMPS's velocity Verlet, 0.5 fs, 300 K, 500 steps of a 16-atom SiGe cell in float64: the
    total energy stays within 1e-6 eV/atom of its start (2.5e-8 measured, while 2e-3 eV/atom of
    potential energy is exchanged), so forces and energies are consistent; the steps come from a
    label/jump loop of the input after the box."""
    model_file = tmp_path / "model.pt"
    save_model(make_model(species=(14, 32)), model_file)
    write_lammps_data(tmp_path / "start.data", sige(), specorder=["Si", "Ge"], masses=True, units="metal")
    script = tmp_path / "in.nve"
    script.write_text(f"units metal\natom_style atomic\nbox tilt large\nread_data {tmp_path / 'start.data'}\n"
                      "velocity all create 300 7 dist gaussian\ntimestep 0.0005\nfix 1 all nve\n"
                      "thermo_style custom step etotal pe ke\nthermo 10\n"
                      "variable i loop 5\nlabel again\nrun 100\nnext i\njump SELF again\n")
    log = tmp_path / "log.lammps"
    fix = run_input(script, model_file, "SCAN", dtype="float64", log=str(log), screen=False)
    assert fix.calls == 5 * 101  # each run: its setup and 100 steps
    rows = np.array([[float(x) for x in line.split()] for line in log.read_text().splitlines()
                     if len(line.split()) == 4 and line.split()[0].isdigit()])
    steps, etotal, epot = rows[:, 0], rows[:, 1], rows[:, 2]
    assert steps.max() == 500
    n = 16
    assert np.ptp(epot) / n > 2e-3  # the atoms move: 2 meV/atom of potential energy exchanged at least
    drift = np.abs(etotal - etotal[0]).max() / n
    print(f"NVE: max |E_tot - E_tot(0)| {drift:.2e} eV/atom, E_pot range {np.ptp(epot) / n:.2e} eV/atom")
    assert drift < 1e-6, f"total energy drifted by {drift:.2e} eV/atom over 250 fs"


def test_npt_barostat_follows_the_model_pressure(tmp_path, make_model):
    """fix npt (LAMMPS's MTK barostat) must see the model's virial. The (scaled) untrained model
    puts the cell under a large negative pressure, so towards a target of 0 the box shrinks; the
    kinetic pressure alone (no virial) would make it grow."""
    model = make_model(species=(14, 32), energy_scale=-30.0)
    lmp, _, _ = lammps_with(tmp_path, sige(), model, fidelity="SCAN")
    lmp.commands_string("thermo_style custom step press vol\nrun 0")
    p0, v0 = lmp.get_thermo("press"), lmp.get_thermo("vol")
    assert p0 < -5000  # bar
    lmp.commands_string("velocity all create 300 3\ntimestep 0.0005\nfix 1 all npt temp 300 300 0.05 tri 0 0 0.2\n"
                        "run 200")
    v1, p1 = lmp.get_thermo("vol"), lmp.get_thermo("press")
    lmp.close()
    assert np.isfinite(p1)
    assert v1 < v0 * 0.995, f"volume {v0:.2f} -> {v1:.2f} A^3 under {p0:.0f} bar"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(1)
    from mfmlip.model import MFPotential, ModelSpec

    model = MFPotential(ModelSpec(species=[14, 32], fidelities=["PBE", "SCAN"], cutoff=4.0, channels=8, lmax=2,
                                  num_layers=2, avg_num_neighbors=10.0)).double().eval()
    path = export_model(model, "SCAN", tmp_path_factory.mktemp("export") / "model.pt2")
    return model, *load_exported(path)  # loaded by torch.export.load


@pytest.mark.parametrize("structure", ["triclinic", "molecule"])
def test_exported_file_reproduces_calculator(exported, structure, ethanol):
    model, module, facts = exported
    assert facts["fidelity"] == "SCAN" and facts["species"] == [14, 32] and facts["cutoff_A"] == 4.0
    if structure == "triclinic":
        atoms = sige()
    else:  # another size than the trace's example, no cell: the shapes are dynamic
        atoms = ethanol
        atoms.numbers = np.where(atoms.numbers == 1, 14, 32)
        atoms.positions *= 1.8  # Si-Si-like distances
    b = atoms_to_batch(atoms, model.cutoff)
    out = [x.detach().numpy() for x in module(b["positions"], b["cell"][0], b["atomic_numbers"], b["edge_index"],
                                              b["shifts"])]
    energy, forces, stress, atomic_energy, atomic_virial = out
    atoms.calc = MFCalculator(model, fidelity="SCAN")
    assert float(energy) == pytest.approx(atoms.get_potential_energy(), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(forces, atoms.get_forces(), atol=1e-12)
    np.testing.assert_allclose(atomic_energy, atoms.get_potential_energies(), atol=1e-12)
    if structure == "triclinic":
        np.testing.assert_allclose(stress, atoms.get_stress(voigt=False), atol=1e-12)
        np.testing.assert_allclose(atomic_virial.sum(0), -stress * atoms.get_volume(), atol=1e-11)
    else:
        np.testing.assert_allclose(atomic_virial.sum(0), np.einsum("ia,ib->ab", atoms.positions, forces), atol=1e-10)


def test_export_command_and_its_fidelity_check(tmp_path, exported, capsys):
    model = exported[0]
    save_model(model, tmp_path / "model.pt")
    assert main(["export", str(tmp_path / "model.pt"), "-o", str(tmp_path / "m.pt2"), "--fidelity", "MP2"]) == 2
    assert "unknown fidelity 'MP2'; this model has ['PBE', 'SCAN']" in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()


# --- bad input: each refused before the run starts -------------------------


@pytest.fixture
def nve_input(tmp_path):
    """A data file of two types (Si, Ge) and an input that would run 10 steps."""
    write_lammps_data(tmp_path / "start.data", sige(), specorder=["Si", "Ge"], masses=True, units="metal")
    script = tmp_path / "in.run"
    script.write_text(f"units metal\natom_style atomic\nbox tilt large\nread_data {tmp_path / 'start.data'}\n"
                      "fix 1 all nve\nrun 10\n")
    return script


@pytest.mark.parametrize("options, message", [
    (["--types", "Si"], "the box has 2 atom type(s) but 1 element(s) were given (Si)"),
    (["--types", "Si Xx"], "['Xx'] are not element symbols"),
    (["--types", "Si O"], "element(s) ['O'] of the atom types unknown to this model; it knows ['Si', 'Ge']"),
    (["--fidelity", "MP2"], "unknown fidelity 'MP2'; this model has ['PBE', 'SCAN']"),
])
def test_bad_input_is_refused_before_the_run(tmp_path, make_model, nve_input, capsys, options, message):
    save_model(make_model(species=(14, 32)), tmp_path / "model.pt")
    args = ["lammps", str(nve_input), "--model", str(tmp_path / "model.pt"), "--log", str(tmp_path / "log")]
    if "--fidelity" not in options:
        args += ["--fidelity", "SCAN"]
    assert main(args + options) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Loop time" not in (tmp_path / "log").read_text() if (tmp_path / "log").exists() else True


def test_type_without_an_element_from_its_mass(tmp_path, make_model, nve_input):
    """A type whose mass names no element (here deuterium-like 2.0) needs --types."""
    data = tmp_path / "start.data"
    data.write_text(re.sub(r"(?m)^2 +72\.6\d*", "2 2.0", data.read_text()))  # Ge's mass
    with pytest.raises(DataError, match="atom type 2: mass 2 g/mol names no element.*--types"):
        run_input(nve_input, make_model(species=(14, 32)), "SCAN", log=None, screen=False)


def test_units_other_than_metal_are_refused(tmp_path, make_model, nve_input):
    nve_input.write_text(nve_input.read_text().replace("units metal", "units real"))
    with pytest.raises(ValueError, match="LAMMPS units 'real'.*'units metal'"):
        run_input(nve_input, make_model(species=(14, 32)), "SCAN", log=None, screen=False)


def test_atoms_too_close_stop_the_run_at_that_step(tmp_path, make_model, nve_input):
    with pytest.raises(DataError, match=r"LAMMPS step 0 .*closer than min_distance=2\.1 A"):
        run_input(nve_input, make_model(species=(14, 32)), "SCAN", min_distance=2.1, log=None, screen=False)


def test_more_than_one_mpi_rank_is_refused(tmp_path):
    # the mpich wheel's launcher, beside this Python's scripts
    mpiexec = shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    code = "from mfmlip.lammps import open_lammps; open_lammps(log=None, screen=False)"
    run = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert run.stderr.count("LAMMPS was started on 2 MPI ranks; the mfmlip fix external route runs on one rank") == 2


def test_missing_lammps_says_what_to_install(tmp_path, make_model, nve_input, monkeypatch, capsys):
    save_model(make_model(species=(14, 32)), tmp_path / "model.pt")
    monkeypatch.setitem(sys.modules, "lammps", None)  # import lammps -> ImportError
    args = ["lammps", str(nve_input), "--model", str(tmp_path / "model.pt"), "--fidelity", "SCAN"]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert 'pip install "mfmlip[lammps]"' in capsys.readouterr().err
