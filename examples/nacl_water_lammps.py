"""NaCl in water in LAMMPS with the multi-fidelity model at MP2, against the ASE run.

Writes the first MP2 box of the data (184 atoms, as ``docs/nacl_water_md/``)
as a LAMMPS data file, then:

1. checks, on that box, that LAMMPS's energy, forces and pressure equal
   :class:`mfmlip.MFCalculator`'s (float64, ``run 0``);
2. runs ``mfmlip lammps docs/lammps/in.nvt`` (10 ps NVT at 300 K, LAMMPS's
   Nose-Hoover ``fix nvt``, 0.5 fs, model in float32 as in the ASE run);
3. times ``mfmlip md`` (ASE, Nose-Hoover, float32) on the same box for
   ``--ase-steps`` steps, in this process, for steps per second;
4. writes O-O and O-H RDFs of the LAMMPS run (first ps left out) with the
   RDF of the MP2 reference boxes, next to the first peaks of the ASE run
   (``docs/nacl_water_md/summary.json``).

    python examples/nacl_water_lammps.py runs/nacl_water/model.pt -o docs/lammps

Trajectories go to ``--work-dir`` (default runs/nacl_water_lammps); a finished
LAMMPS run is not repeated. Units: eV, Angstrom, fs, ps, K.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ase.io import read
from ase.io.lammpsdata import write_lammps_data

from mfmlip.analysis.figures import new_figure, save_figure
from mfmlip.analysis.structure import rdf

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "nacl_water" / "MP2.extxyz"
TYPES = ("O", "H", "Na", "Cl")
PAIRS = ("O-O", "O-H")
RMAX, BINS = 5.9, 118  # as examples/nacl_water_md.py
NKTV2P = 1.6021765e6  # LAMMPS metal units: bar per eV/Angstrom^3
# the ASE run's hydrogen-bond peak (r A, g), from the table of docs/nacl_water_md/README.md (not in its summary.json)
ASE_HYDROGEN_BOND_PEAK = (1.83, 1.39)


def write_start(data: Path, path: Path):
    atoms = read(data, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_lammps_data(path, atoms, specorder=list(TYPES), masses=True, units="metal", atom_style="atomic")
    return atoms


def agreement(model, start: Path, atoms) -> dict:
    """LAMMPS (run 0, float64) against MFCalculator on the start box."""
    from ase.units import bar

    from mfmlip import MFCalculator
    from mfmlip.lammps import MFFixExternal, open_lammps

    lmp = open_lammps(log=None, screen=False)
    lmp.commands_string(f"units metal\natom_style atomic\nread_data {start}")
    fix = MFFixExternal(lmp, model, "MP2", elements=TYPES, dtype="float64")
    lmp.commands_string("thermo_style custom pe pxx pyy pzz pxy pxz pyz\nrun 0")
    energy = lmp.get_thermo("pe")
    pressure = np.array([lmp.get_thermo(k) for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz")])
    forces = lmp.numpy.extract_atom("f")[np.argsort(lmp.numpy.extract_atom("id"))].copy()
    lmp.close()
    atoms = atoms.copy()
    atoms.calc = MFCalculator(fix.predictor.model, fidelity="MP2")
    s = atoms.get_stress(voigt=False)
    reference = -np.array([s[0, 0], s[1, 1], s[2, 2], s[0, 1], s[0, 2], s[1, 2]]) * NKTV2P  # bar, no kinetic part
    return {"energy_diff_eV": float(energy - atoms.get_potential_energy()),
            "max_force_diff_eV_A": float(np.abs(forces - atoms.get_forces()).max()),
            "max_pressure_diff_bar": float(np.abs(pressure - reference).max()),
            "pressure_bar": float(pressure[:3].mean()), "ase_bar_per_lammps_bar": float(1 / bar / NKTV2P)}


def run_lammps(model, start: Path, work: Path, steps: int) -> Path:
    log = work / "log.lammps"
    if log.is_file() and "Total wall time" in log.read_text():
        return log
    cmd = ["mfmlip", "lammps", str(ROOT / "docs" / "lammps" / "in.nvt"), "--model", str(model), "--fidelity",
           "MP2", "--types", " ".join(TYPES), "--dtype", "float32", "--var", "data", str(start), "--var", "out",
           str(work), "--var", "steps", str(steps), "--log", str(log), "--no-screen"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return log


def read_thermo(log: Path) -> dict:
    """The thermo table of a LAMMPS log (one run) and its steps per second."""
    lines = log.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["Step", "Time"])
    names = lines[start].split()
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("Loop time"):
            break
        rows.append([float(x) for x in line.split()])
    table = dict(zip(names, np.array(rows).T))
    speed = re.search(r"([\d.]+) timesteps/s", log.read_text())
    table["steps_per_s"] = float(speed.group(1)) if speed else None  # None: the run has not finished
    return table


def time_ase(model, atoms, steps: int, work: Path) -> float:
    """Steps per second of mfmlip md's engine (ASE Nose-Hoover, float32) on this box."""
    from mfmlip import MFCalculator
    from mfmlip.simulation.md import MDSettings, run_md

    settings = MDSettings(ensemble="nvt", temperature_K=300.0, timestep_fs=0.5, steps=steps, thermostat="nose-hoover",
                          log_interval=20, trajectory_interval=steps, checkpoint_interval=steps)
    calc = MFCalculator(model, fidelity="MP2", dtype="float32")
    t0 = time.perf_counter()
    run_md(atoms.copy(), calc, settings, trajectory=work / "ase.traj", logfile=work / "ase_log.csv",
           checkpoint=work / "ase_checkpoint.json", progress=False)
    return steps / (time.perf_counter() - t0)


def first_minimum_after(result, pair: str, lo: float, hi: float) -> tuple[float, float]:
    window = (result.r >= lo) & (result.r <= hi)
    k = np.flatnonzero(window)[np.argmin(result.g[pair][window])]
    return float(result.r[k]), float(result.g[pair][k])


def hydrogen_bond_peak(result) -> tuple[float, float]:
    window = (result.r >= 1.5) & (result.r <= 2.2)
    k = np.flatnonzero(window)[np.argmax(result.g["O-H"][window])]
    return float(result.r[k]), float(result.g["O-H"][k])


def plot_rdfs(curves: dict, ase_peaks: dict, path: Path) -> Path:
    fig, axes = new_figure(1, 2, figsize=(10, 4))
    for ax, pair in zip(axes, PAIRS):
        for name, (result, style) in curves.items():
            ax.plot(result.r, result.g[pair], style, label=name, lw=1.2)
        if pair in ase_peaks:
            r, g = ase_peaks[pair]
            ax.plot([r], [g], "kx", ms=8, label="ASE run (docs/nacl_water_md), peak")
        ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
        ax.set_xlabel("r (A)")
        ax.set_ylabel(f"g_{pair}(r)")
    axes[0].set_title("O-O")
    axes[1].set_ylim(0, 2.5)  # the covalent O-H peak (g ~ 35) would hide the hydrogen bonds
    axes[1].set_title("O-H (covalent peak cut off)")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("-o", "--output-dir", default="docs/lammps")
    parser.add_argument("--work-dir", default="runs/nacl_water_lammps")
    parser.add_argument("--data", default=str(DATA), help="MP2 boxes; the first is the start")
    parser.add_argument("--steps", type=int, default=20000, help="NVT steps (default 10 ps at 0.5 fs)")
    parser.add_argument("--ase-steps", type=int, default=500, help="steps of the ASE timing run")
    parser.add_argument("--equilibration", type=float, default=1.0, help="ps left out of the RDFs and averages")
    parser.add_argument("--analyse-only", action="store_true",
                        help="no runs: analyse the LAMMPS run in --work-dir as far as it got")
    args = parser.parse_args()
    work, out = Path(args.work_dir), Path(args.output_dir)
    start = work / "start.data"
    atoms = write_start(Path(args.data), start)
    summary = {"model": str(args.model), "n_atoms": len(atoms), "start_agreement_float64": agreement(
        args.model, start, atoms)}
    print(json.dumps(summary, indent=2), flush=True)
    log = work / "log.lammps" if args.analyse_only else run_lammps(args.model, start, work, args.steps)
    thermo = read_thermo(log)
    summary["lammps_steps_per_s"] = thermo["steps_per_s"]
    if not args.analyse_only:
        summary["ase_steps_per_s"] = time_ase(args.model, atoms, args.ase_steps, work)
        summary["load_average"] = os.getloadavg()
    frames = read(work / "nvt.dump", ":", format="lammps-dump-text", specorder=list(TYPES))
    frames = frames[:len(thermo["Step"])]  # a dump frame and a thermo row every 20 steps
    frame_time = np.arange(len(frames)) * 20 * 0.5e-3  # ps: a frame every 20 steps of 0.5 fs
    kept = [a for a, t in zip(frames, frame_time) if t >= args.equilibration]
    after = thermo["Time"] >= args.equilibration
    n = len(atoms)
    summary["nvt"] = {
        "duration_ps": float(thermo["Time"][-1]), "frames": len(frames), "rdf_frames": len(kept),
        "mean_temperature_K": float(thermo["Temp"][after].mean()),
        "epot_std_meV_atom": float(thermo["PotEng"][after].std() / n * 1000),
        "epot_range_meV_atom": float(np.ptp(thermo["PotEng"]) / n * 1000),
        "closest_pair_A": float(min(np.min(a.get_all_distances(mic=True)[np.triu_indices(n, 1)]) for a in frames)),
    }
    lammps_rdf = rdf(kept, PAIRS, rmax=RMAX, bins=BINS)
    reference = rdf(read(args.data, ":"), PAIRS, rmax=RMAX, bins=BINS)
    ase = json.loads((ROOT / "docs" / "nacl_water_md" / "summary.json").read_text())["rdf_first_peak"]["NVT MP2"]
    summary["rdf"] = {name: {"O-O_first_peak": r.first_peak("O-O"), "O-H_hydrogen_bond_peak": hydrogen_bond_peak(r),
                             "O-H_minimum_2.2-2.8A": first_minimum_after(r, "O-H", 2.2, 2.8)}
                      for name, r in (("LAMMPS NVT MP2", lammps_rdf), ("MP2 reference boxes", reference))}
    summary["rdf"]["ASE NVT MP2 (docs/nacl_water_md)"] = {"O-O_first_peak": ase["O-O"],
                                                          "O-H_hydrogen_bond_peak": ASE_HYDROGEN_BOND_PEAK}
    out.mkdir(parents=True, exist_ok=True)
    label = f"LAMMPS NVT at MP2 ({args.equilibration:g}-{summary['nvt']['duration_ps']:g} ps)"
    plot_rdfs({label: (lammps_rdf, "-"), "MP2 reference boxes": (reference, ":")},
              {"O-O": ase["O-O"], "O-H": ASE_HYDROGEN_BOND_PEAK}, out / "rdf.png")
    lammps_rdf.to_csv(out / "rdf_lammps.csv")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
