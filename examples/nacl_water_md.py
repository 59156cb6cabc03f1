"""MD checks of a NaCl-water model: stability at MP2, RDFs against revPBE0-D3, NVE drift.

Runs ``mfmlip md`` three times from the first MP2 box of the data (184 atoms):
300 K NVT (Langevin, float32 by default) at the MP2 and at the revPBE0-D3
fidelity, side by side, then NVE (float64) at MP2 from the end of the MP2 NVT
run. It then checks every
trajectory frame:

- no two atoms closer than 0.6 Angstrom (minimum image);
- no O-H bond broken: every H stays within 1.3 Angstrom of the O it was bonded
  to at the start (an O-H bond is about 1.0 Angstrom and vibrates by about
  0.1 Angstrom at 300 K);
- the potential energy bounded: its range, and the change of its mean from
  the first to the last picosecond after equilibration, next to its spread;

and writes O-O and O-H RDFs of both fidelities (first ps dropped) next to the
RDF of the MP2 reference boxes, and the NVE drift of the total energy in
meV/atom/ps (least-squares line). Units: eV, Angstrom, fs, ps, K.

    python examples/nacl_water_md.py runs/nacl_water/model.pt -o docs/nacl_water_md

The trajectories go to ``--work-dir`` (default runs/nacl_water_md); running the
script again resumes killed runs and skips finished ones. Only the plots
(``stability.png``, ``rdf.png``) and ``summary.json`` go to ``-o``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from ase.io import read, write

from mfmlip.analysis.figures import new_figure, save_figure
from mfmlip.analysis.structure import rdf
from mfmlip.simulation.md import read_log

HIGH, LOW = "MP2", "revPBE0-D3"
MIN_DISTANCE, OH_BROKEN = 0.6, 1.3  # Angstrom
PAIRS = ("O-O", "O-H")
RMAX = 5.9  # Angstrom: within half the smallest cell width of the MP2 boxes (5.92)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nacl_water" / "MP2.extxyz"


def finished(out: Path, steps: int) -> bool:
    try:
        return read_log(out / "md_log.csv")["step"][-1] >= steps
    except (OSError, ValueError):  # no log yet, or killed before its first row
        return False


def start_md(model, start, out: Path, fidelity, ensemble, args, threads):
    """``mfmlip md`` in the background (resumed if a checkpoint exists); None if finished."""
    steps = args.nve_steps if ensemble == "nve" else args.steps
    if finished(out, steps):
        return None
    cmd = ["mfmlip", "md", str(model), str(start), "--fidelity", fidelity, "--ensemble", ensemble,
           "--timestep", str(args.timestep), "--steps", str(steps), "--seed", str(args.seed),
           "--traj-interval", "20", "--log-interval", "10", "--no-progress", "-o", str(out),
           "--dtype", "float64" if ensemble == "nve" else args.nvt_dtype]
    if ensemble != "nve":
        cmd += ["--temperature", str(args.temperature)]
    if (out / "checkpoint.json").is_file():
        cmd.append("--resume")
    out.mkdir(parents=True, exist_ok=True)
    print(" ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, env=env, stdout=open(out / "stdout.log", "a"), stderr=subprocess.STDOUT)


def wait(processes) -> None:
    for p in filter(None, processes):
        if p.wait() != 0:
            out = p.args[p.args.index("-o") + 1]
            sys.exit(f"{' '.join(p.args)} failed (exit {p.returncode}); see {out}/stdout.log")


def stability(frames) -> dict:
    """Per frame: closest pair distance and longest of the starting O-H bonds, Angstrom."""
    first = frames[0]
    o, h = np.flatnonzero(first.numbers == 8), np.flatnonzero(first.numbers == 1)
    partner = o[np.argmin(first.get_all_distances(mic=True)[np.ix_(h, o)], axis=1)]
    closest, longest_oh = [], []
    for atoms in frames:
        d = atoms.get_all_distances(mic=True)
        np.fill_diagonal(d, np.inf)
        closest.append(d.min())
        longest_oh.append(d[h, partner].max())
    return {"closest": np.array(closest), "longest_oh": np.array(longest_oh)}


def energy_bounds(log: dict, n_atoms: int, skip_ps: float) -> dict:
    """Potential-energy range, spread after ``skip_ps``, and the change of its mean from the
    first to the last ``skip_ps`` window after equilibration, meV/atom."""
    t, e = log["time_ps"], log["epot_eV"] / n_atoms * 1000
    early, late = e[(t >= skip_ps) & (t < 2 * skip_ps)], e[t >= t[-1] - skip_ps]
    return {"epot_range_meV_atom": float(e.max() - e.min()), "epot_std_meV_atom": float(e[t >= skip_ps].std()),
            "epot_mean_change_meV_atom": float(late.mean() - early.mean())}


def nve_drift(log: dict, n_atoms: int) -> dict:
    """Slope of the total energy per atom (meV/atom/ps) and its fluctuation (meV/atom)."""
    t, e = log["time_ps"], log["etot_eV"] / n_atoms * 1000
    slope, intercept = np.polyfit(t, e, 1)
    return {"drift_meV_atom_ps": float(slope), "etot_std_meV_atom": float((e - (slope * t + intercept)).std()),
            "duration_ps": float(t[-1] - t[0])}


def plot_checks(runs: dict, path: Path) -> Path:
    fig, axes = new_figure(3, 1, figsize=(7, 8), sharex=True)
    for name, r in runs.items():
        axes[0].plot(r["log"]["time_ps"], r["log"]["epot_eV"] / r["n_atoms"], label=name, lw=0.8)
        axes[1].plot(r["frame_time"], r["closest"], label=name, lw=0.8)
        axes[2].plot(r["frame_time"], r["longest_oh"], label=name, lw=0.8)
    axes[1].axhline(MIN_DISTANCE, color="k", ls="--", lw=0.8)
    axes[2].axhline(OH_BROKEN, color="k", ls="--", lw=0.8)
    for ax, label in zip(axes, ("potential energy (eV/atom)", "closest pair (A)", "longest O-H bond (A)")):
        ax.set_ylabel(label)
    axes[0].legend()
    axes[2].set_xlabel("time (ps)")
    return save_figure(fig, path)


def plot_rdfs(curves: dict, path: Path) -> Path:
    fig, axes = new_figure(1, 2, figsize=(10, 4))
    for ax, pair in zip(axes, PAIRS):
        for name, (result, style) in curves.items():
            ax.plot(result.r, result.g[pair], style, label=name, lw=1.2)
        ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
        ax.set_xlabel("r (A)")
        ax.set_ylabel(f"g_{pair}(r)")
        ax.set_title(pair)
    axes[1].set_ylim(0, 2.5)  # the intramolecular O-H peak (g ~ 35) would hide the hydrogen bonds
    axes[1].set_title("O-H (covalent peak cut off)")
    axes[0].legend()
    return save_figure(fig, path)


def analyse(work: Path, data: Path, args) -> dict:
    skip = min(args.equilibration, args.steps * args.timestep / 1000 / 2)  # ps; half of a short test run
    runs, curves = {}, {}
    styles = {f"NVT {HIGH}": "-", f"NVT {LOW}": "--"}
    for name in (f"NVT {HIGH}", f"NVT {LOW}", f"NVE {HIGH}"):
        folder = work / name.replace(" ", "_")
        frames = read(folder / "md.traj", ":")
        log = read_log(folder / "md_log.csv")
        r = {"n_atoms": len(frames[0]), "log": log,
             "frame_time": np.array([a.info["step"] for a in frames]) * args.timestep / 1000, **stability(frames)}
        runs[name] = r
        if name in styles:
            kept = [a for a, t in zip(frames, r["frame_time"]) if t >= skip]
            curves[name] = (rdf(kept, PAIRS, rmax=RMAX, bins=118), styles[name])
    reference = read(data, ":")
    curves[f"{HIGH} reference boxes ({len(reference)})"] = (rdf(reference, PAIRS, rmax=RMAX, bins=118), ":")
    out = Path(args.output_dir)
    plot_checks(runs, out / "stability.png")
    plot_rdfs(curves, out / "rdf.png")
    summary = {"model": str(args.model), "timestep_fs": args.timestep, "temperature_K": args.temperature,
               "nvt_dtype": args.nvt_dtype, "nve_dtype": "float64",
               "equilibration_ps": skip}
    for name, r in runs.items():
        summary[name] = {
            "duration_ps": float(r["log"]["time_ps"][-1]), "frames": len(r["closest"]),
            "closest_pair_A": float(r["closest"].min()), "longest_OH_A": float(r["longest_oh"].max()),
            "stable": bool(r["closest"].min() > MIN_DISTANCE and r["longest_oh"].max() < OH_BROKEN),
            "mean_temperature_K": float(r["log"]["temperature_K"][r["log"]["time_ps"] >= skip].mean()),
            **energy_bounds(r["log"], r["n_atoms"], skip),
        }
    summary[f"NVE {HIGH}"].update(nve_drift(runs[f"NVE {HIGH}"]["log"], runs[f"NVE {HIGH}"]["n_atoms"]))
    for name, (result, _) in curves.items():
        summary.setdefault("rdf_first_peak", {})[name] = {p: result.first_peak(p) for p in PAIRS}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("-o", "--output-dir", default="docs/nacl_water_md")
    parser.add_argument("--work-dir", default="runs/nacl_water_md")
    parser.add_argument("--data", default=str(DATA), help="MP2 boxes; the first is the start")
    parser.add_argument("--steps", type=int, default=20000, help="NVT steps (default 10 ps at 0.5 fs)")
    parser.add_argument("--nve-steps", type=int, default=4000, help="NVE steps (default 2 ps at 0.5 fs)")
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nvt-dtype", default="float32", choices=["float32", "float64"],
                        help="NVT precision (1.7x faster in float32 here); NVE always runs in float64")
    parser.add_argument("--equilibration", type=float, default=1.0, help="ps left out of RDFs and averages")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    start = work / "start.xyz"
    write(start, read(args.data, 0))
    threads = max(1, (os.cpu_count() or 2) // 2)
    wait([start_md(args.model, start, work / f"NVT_{f}", f, "nvt", args, threads) for f in (HIGH, LOW)])
    wait([start_md(args.model, work / f"NVT_{HIGH}" / "md.traj", work / f"NVE_{HIGH}", HIGH, "nve", args,
                   os.cpu_count() or 2)])
    summary = analyse(work, Path(args.data), args)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
