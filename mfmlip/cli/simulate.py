"""Simulation and structure-analysis subcommands of ``mfmlip``:
``relax``, ``eos``, ``md`` (need a model and ``--fidelity``) and ``rdf``,
``adf``, ``coordination`` (analyse a trajectory; no model).

Units: eV, Angstrom, fs (time step), ps (log time), K, GPa.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from mfmlip.cli import types
from mfmlip.keys import FLOAT_DTYPES
from mfmlip.simulation.md import BAROSTATS, ENSEMBLES, THERMOSTATS
from mfmlip.simulation.relax import OPTIMIZERS


def _read(path: str, index):
    """ase.io.read with errors turned into FileNotFoundError / ValueError naming the file."""
    import ase.io

    if not Path(path).is_file():
        raise FileNotFoundError(f"structure file {path} not found")
    try:
        return ase.io.read(path, index=index)
    except Exception as err:  # ASE raises many types for unreadable files
        raise ValueError(f"cannot read {path} (index {index}): {err}") from err


def _calculator(args):
    from mfmlip.simulation.calculator import MFCalculator

    return MFCalculator(args.model, fidelity=args.fidelity, device=args.device, dtype=args.dtype,
                        min_distance=args.min_distance)


def _relax(args) -> None:
    from ase.io import write
    from ase.units import GPa

    from mfmlip.simulation.relax import max_force, relax

    atoms = _read(args.structure, args.index)
    calc = _calculator(args)
    out = Path(args.output or f"{Path(args.structure).stem}_relaxed.extxyz")
    traj = out.with_name(f"{out.stem}_trajectory.traj")
    start = atoms.copy()
    start.calc = calc
    e_start = start.get_potential_energy()
    relaxed, converged = relax(atoms, calc, fmax=args.fmax, optimizer=args.optimizer, cell=args.cell,
                               steps=args.steps, trajectory=traj, pressure_GPa=args.pressure)
    energy = relaxed.get_potential_energy()
    out.parent.mkdir(parents=True, exist_ok=True)
    write(out, relaxed)
    n = len(relaxed)
    print(f"energy: {e_start:.6f} -> {energy:.6f} eV ({energy / n:.6f} eV/atom), "
          f"max force {max_force(relaxed):.4g} eV/A (fmax {args.fmax})")
    if bool(np.all(relaxed.pbc)):
        stress = relaxed.get_stress() / GPa
        print(f"volume {relaxed.get_volume():.4f} A^3 ({relaxed.get_volume() / n:.4f} A^3/atom), "
              f"cell lengths {np.round(relaxed.cell.lengths(), 5).tolist()} A, "
              f"angles {np.round(relaxed.cell.angles(), 3).tolist()} deg, "
              f"pressure {-stress[:3].mean():.4f} GPa")
    print(f"relaxed structure written to {out}, trajectory to {traj}")
    if not converged:
        print(f"mfmlip relax: not converged within {args.steps} steps", file=sys.stderr)
        raise SystemExit(1)


def _eos(args) -> None:
    from mfmlip.simulation.eos import equation_of_state

    atoms = _read(args.structure, args.index)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = equation_of_state(atoms, _calculator(args), points=args.points, volume_range=tuple(args.range),
                               eos=args.eos, fmax=args.fmax, relax_steps=args.relax_steps, plot=out / "eos.png")
    print(result.table())
    if not result.converged.all():
        print(f"warning: position relaxation did not reach fmax={args.fmax} eV/A at "
              f"{int((~result.converged).sum())} of {len(result.converged)} volumes", file=sys.stderr)
    with open(out / "eos.csv", "w") as fh:
        fh.write("volume_A3_per_atom,energy_eV_per_atom,relax_converged\n")
        for v, e, ok in zip(result.volumes, result.energies, result.converged):
            fh.write(f"{v:.8g},{e:.10g},{int(ok)}\n")
    (out / "eos.json").write_text(json.dumps({"n_atoms": result.n_atoms, "units": {
        "E0": "eV/atom", "V0": "A^3/atom", "B": "GPa"}, "fits": result.fits}, indent=2))
    print(f"points and fits written to {out / 'eos.csv'}, {out / 'eos.json'}; plot {out / 'eos.png'}")


def _md(args) -> None:
    from mfmlip.simulation.md import MDSettings, read_log, run_md

    settings = MDSettings(
        ensemble=args.ensemble, temperature_K=args.temperature, pressure_GPa=args.pressure,
        timestep_fs=args.timestep, steps=args.steps, seed=args.seed, log_interval=args.log_interval,
        trajectory_interval=args.traj_interval, checkpoint_interval=args.checkpoint_interval,
        thermostat=args.thermostat, barostat=args.barostat, friction_per_fs=args.friction,
        tdamp_fs=args.tdamp, pdamp_fs=args.pdamp, compressibility_per_GPa=args.compressibility,
    )
    atoms = _read(args.structure, args.index)
    out = Path(args.output_dir)
    result = run_md(atoms, _calculator(args), settings, trajectory=out / "md.traj", logfile=out / "md_log.csv",
                    checkpoint=out / "checkpoint.json", resume=args.resume, progress=not args.no_progress)
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from}")
    log = read_log(result.log)
    print(f"{result.steps} steps done ({result.steps_run} in this call), "
          f"{result.steps * args.timestep / 1000:.4g} ps")
    summary = (f"averages over {len(log['step'])} log rows: T {np.mean(log['temperature_K']):.2f} K, "
               f"E_pot {np.mean(log['epot_eV']):.6f} eV")
    if np.isfinite(log["volume_A3"]).all():
        summary += f", volume {np.mean(log['volume_A3']):.4f} A^3"
    if np.isfinite(log["pressure_GPa"]).all():
        summary += f", pressure {np.mean(log['pressure_GPa']):.4f} GPa"
    print(summary)
    print(f"trajectory {result.trajectory}, log {result.log}, checkpoint {result.checkpoint}")


def _rdf(args) -> None:
    from mfmlip.analysis.structure import rdf

    frames = _read(args.trajectory, args.index)
    pairs = [p for p in args.pairs.split(",") if p.strip()]
    result = rdf(frames, pairs, rmax=args.rmax, bins=args.bins)
    out = Path(args.output_dir)
    tag = "_".join(result.g)
    csv_path, png = result.to_csv(out / f"rdf_{tag}.csv"), result.plot(out / f"rdf_{tag}.png")
    print(f"RDF over {result.n_frames} frames, rmax {result.edges[-1]:.4g} A, {len(result.r)} bins")
    for pair in result.g:
        r, g = result.first_peak(pair)
        print(f"  {pair}: first peak at {r:.3f} A, g = {g:.3f}")
    print(f"written {csv_path}, {png}")


def _adf(args) -> None:
    from mfmlip.analysis.structure import adf

    frames = _read(args.trajectory, args.index)
    result = adf(frames, args.triplet, args.cutoff, bins=args.bins)
    out = Path(args.output_dir)
    csv_path, png = result.to_csv(out / f"adf_{result.name}.csv"), result.plot(out / f"adf_{result.name}.png")
    print(f"{result.name} angles within {result.cutoff:g} A over {result.n_frames} frames: "
          f"{int(result.counts.sum())} triplets, {result.triplets_per_centre:.3f} per {result.triplet[1]} atom")
    print(f"  peaks (degrees): {np.round(result.peaks(), 1).tolist()}")
    print(f"written {csv_path}, {png}")


def _coordination(args) -> None:
    from mfmlip.analysis.structure import coordination

    frames = _read(args.trajectory, args.index)
    result = coordination(frames, args.pair, args.cutoff)
    out = Path(args.output_dir)
    stem = f"coordination_{result.name}"
    csv_path, png = result.to_csv(out / f"{stem}.csv"), result.plot(out / f"{stem}.png")
    print(f"{result.name} coordination within {result.cutoff:g} A over {result.n_frames} frames: "
          f"mean {result.mean:.4f}")
    for value, count, fraction in zip(result.values, result.counts, result.fraction):
        if count:
            print(f"  {value:3d}: {fraction:7.2%} ({count})")
    print(f"written {csv_path}, {png}")


def _model_arguments(p) -> None:
    p.add_argument("model", help="model file (model.pt) written by mfmlip train")
    p.add_argument("structure", help="ASE-readable structure file")
    p.add_argument("--fidelity", required=True, help="fidelity to simulate at")
    p.add_argument("--index", type=types.ase_index, default="-1",
                   help="ASE index of the frame to start from (default: last)")
    p.add_argument("--device", type=types.device, default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default="float64",
                   help="model precision (default float64: smoother energy surface for optimisers and MD)")
    p.add_argument("--min-distance", type=types.non_negative_float, default=0.1,
                   help="refuse structures with two atoms closer than this (Angstrom; default 0.1)")


def _analysis_arguments(p, what: str) -> None:
    p.add_argument("trajectory", help="ASE-readable trajectory (e.g. md.traj from mfmlip md)")
    p.add_argument("--index", type=types.ase_index, default=":",
                   help="ASE index of the frames to use (default all, e.g. 100: "
                   "to skip equilibration)")
    p.add_argument("-o", "--output-dir", default=".", help=f"where the {what} CSV and PNG go")


def add_parsers(sub) -> None:
    """Add ``relax``, ``eos``, ``md``, ``rdf``, ``adf``, ``coordination`` to an argparse subparsers object."""
    p = sub.add_parser("relax", help="relax positions (and with --cell the cell) with an ASE optimiser",
                       description="Relax a structure; writes the relaxed structure and the trajectory "
                       "(OUT stem + _trajectory.traj). Exit status 1 if not converged.")
    _model_arguments(p)
    p.add_argument("--cell", action="store_true", help="also relax the cell (FrechetCellFilter)")
    p.add_argument("--fmax", type=types.positive_float, default=0.01, help="force criterion, eV/A (default 0.01)")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="LBFGS")
    p.add_argument("--steps", type=types.positive_int, default=1000, help="maximum optimiser steps")
    p.add_argument("--pressure", type=types.finite_float, default=0.0, help="external pressure with --cell, GPa")
    p.add_argument("-o", "--output", help="relaxed structure file (default STRUCTURE-stem_relaxed.extxyz)")
    p.set_defaults(func=_relax)

    p = sub.add_parser("eos", help="equation of state: E0 (eV/atom), V0 (A^3/atom), B (GPa)",
                       description="Scale the cell over a volume range, relax positions at each volume and fit "
                       "Murnaghan and Birch-Murnaghan; writes eos.png, eos.csv, eos.json.")
    _model_arguments(p)
    p.add_argument("--points", type=types.positive_int, default=9, help="number of volumes (default 9)")
    p.add_argument("--range", type=types.positive_float, nargs=2, default=[0.9, 1.1], metavar=("LOW", "HIGH"),
                   help="volume range as fractions of the input volume (default 0.9 1.1)")
    p.add_argument("--eos", nargs="+", default=["murnaghan", "birchmurnaghan"], help="ASE EOS names")
    p.add_argument("--fmax", type=types.positive_float, default=0.01, help="position relaxation criterion, eV/A")
    p.add_argument("--relax-steps", type=types.non_negative_int, default=200,
                   help="maximum optimiser steps per volume (0: none)")
    p.add_argument("-o", "--output-dir", default=".", help="where eos.png/csv/json go")
    p.set_defaults(func=_eos)

    p = sub.add_parser("md", help="molecular dynamics (NVT, NPT, NVE) with checkpoints",
                       description="Molecular dynamics with ASE integrators; writes DIR/md.traj, DIR/md_log.csv "
                       "and DIR/checkpoint.json. --resume continues a killed run from its checkpoint.")
    _model_arguments(p)
    p.add_argument("--ensemble", choices=ENSEMBLES, required=True)
    p.add_argument("--temperature", type=types.non_negative_float,
                   help="K; required for nvt/npt, initial velocities for nve")
    p.add_argument("--pressure", type=types.finite_float, default=0.0, help="npt target pressure, GPa (default 0)")
    p.add_argument("--timestep", type=types.positive_float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--steps", type=types.positive_int, required=True,
                   help="total steps, including any done before --resume")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.json")
    p.add_argument("--seed", type=types.integer, default=0, help="seed of initial velocities and Langevin noise")
    p.add_argument("--thermostat", choices=THERMOSTATS, default="langevin", help="nvt integrator")
    p.add_argument("--barostat", choices=BAROSTATS, default="mtk",
                   help="npt integrator: MTK (Nose-Hoover chains, correct ensemble) or Berendsen (equilibration)")
    p.add_argument("--friction", type=types.non_negative_float, default=0.01, help="Langevin friction, 1/fs")
    p.add_argument("--tdamp", type=types.positive_float, help="thermostat time constant, fs (default 100 time steps)")
    p.add_argument("--pdamp", type=types.positive_float, help="barostat time constant, fs (default 1000 time steps)")
    p.add_argument("--compressibility", type=types.positive_float, default=0.01, help="Berendsen only, 1/GPa")
    p.add_argument("--log-interval", type=types.positive_int, default=10, help="steps between log rows")
    p.add_argument("--traj-interval", type=types.positive_int, default=10, help="steps between trajectory frames")
    p.add_argument("--checkpoint-interval", type=types.positive_int, default=100, help="steps between checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output-dir", default="md", help="output folder (default ./md)")
    p.set_defaults(func=_md)

    p = sub.add_parser("rdf", help="partial radial distribution functions g(r)")
    _analysis_arguments(p, "RDF")
    p.add_argument("--pairs", required=True, help="comma-separated pairs, e.g. O-O,O-H")
    p.add_argument("--rmax", type=types.positive_float, help="A; default half the smallest cell width (at most 10)")
    p.add_argument("--bins", type=types.positive_int, default=200)
    p.set_defaults(func=_rdf)

    p = sub.add_parser("adf", help="angular distribution of A-B-C triplets (B the vertex)")
    _analysis_arguments(p, "ADF")
    p.add_argument("--triplet", required=True, help="e.g. O-O-O or H-O-H")
    p.add_argument("--cutoff", type=types.positive_float, required=True, help="B-A and B-C cutoff, A")
    p.add_argument("--bins", type=types.positive_int, default=180)
    p.set_defaults(func=_adf)

    p = sub.add_parser("coordination", help="coordination-number histogram of a pair within a cutoff")
    _analysis_arguments(p, "coordination")
    p.add_argument("--pair", required=True, help="e.g. Si-Si or O-H (neighbours B of each A)")
    p.add_argument("--cutoff", type=types.positive_float, required=True, help="A")
    p.set_defaults(func=_coordination)
