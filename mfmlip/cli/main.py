"""The ``mfmlip`` command line: ``train``, ``prepare``, ``evaluate``, ``study``, and the simulation and
analysis commands of :mod:`mfmlip.cli.simulate` (``relax``, ``eos``, ``md``,
``rdf``, ``adf``, ``coordination``)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from mfmlip.cli import lammps as lammps_commands  # imports no torch
from mfmlip.cli import types
from mfmlip.cli.allocator import ENV as ALLOCATOR_ENV
from mfmlip.cli.allocator import reexec_with_tcmalloc, tune_glibc_malloc

TRACEBACK_ENV = "MFMLIP_TRACEBACK"  # set to 1: unexpected errors end in their traceback
# train options that override training.* (option: field)
PARALLEL_OPTIONS = {"devices": "devices", "num_nodes": "num_nodes", "strategy": "strategy", "accelerator": "device"}


def _train(args) -> None:
    from mfmlip.training.config import load_config
    from mfmlip.training.run import train

    cfg = load_config(args.config)
    given = {field: getattr(args, k) for k, field in PARALLEL_OPTIONS.items() if getattr(args, k) is not None}
    if given:  # validated as if written in the config
        cfg.training = type(cfg.training).model_validate({**cfg.training.model_dump(), **given})
    train(cfg, data_root=args.data_root, resume=args.resume, overwrite=args.overwrite)


def _prepare(args) -> None:
    from mfmlip.training.stores import prepare

    out = args.output_dir or Path("stores") / Path(args.config).stem
    config = prepare(args.config, out, data_root=args.data_root)
    print(f"stores and the config that trains from them written to {out}; train with:\n  mfmlip train {config}")


def _no_labels(args) -> str:
    """The message for a data file without energy or force labels."""
    from mfmlip.data.structures import frame_keys

    keys = frame_keys(args.data, args.index)
    return (f"{args.data}: no frame (index {args.index!r}) has an energy or force label under "
            f"--energy-key {args.energy_key!r} or --forces-key {args.forces_key!r}; the frames have "
            f"{', '.join(keys) or 'no labels'}. Name the keys, or give --predictions-only to write the "
            "model's predictions without metrics")


def _write_predictions(model, structures, args, path: Path) -> Path:
    """Predicted energies (eV) and forces (eV/A) of every structure, as extxyz."""
    import ase.io
    import torch
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from mfmlip import keys as K
    from mfmlip.atomic_io import atomic_write
    from mfmlip.model.inference import Predictor

    frames = []
    for chunk, batch, pred in Predictor(model, args.fidelity, args.device).predict(structures, args.batch_size):
        forces = torch.split(pred[K.FORCES].double().cpu(), batch[K.N_ATOMS].tolist())
        for s, energy, f in zip(chunk, pred[K.ENERGY].double().cpu().tolist(), forces, strict=True):
            atoms = Atoms(numbers=s.atomic_numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
            atoms.info.update(fidelity=args.fidelity, source_index=s.frame)
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=f.numpy())
            frames.append(atoms)
    atomic_write(path, lambda fh: ase.io.write(fh, frames, format="extxyz"), mode="w")
    return path


def _evaluate(args) -> None:
    from mfmlip.analysis.evaluate import evaluate, parity_plot
    from mfmlip.analysis.metrics import format_table
    from mfmlip.data.structures import DataError, read_structures
    from mfmlip.model.serialization import load_model
    from mfmlip.training.checks import label_counts

    model = load_model(args.model, device=args.device)
    model.fidelity_index(args.fidelity)  # clear error before reading data
    structures = read_structures(args.data, args.index, fidelity=args.fidelity, energy_key=args.energy_key,
                                 forces_key=args.forces_key)
    counts = label_counts(structures)
    labelled = counts["energy"] or counts["forces"]
    unknown = {int(z) for s in structures for z in s.atomic_numbers} - set(model.species)
    if not (labelled or args.predictions_only or unknown):  # unknown elements: evaluate names them first
        raise DataError(_no_labels(args))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(args.data).stem}_{args.fidelity}")
    if args.predictions_only:
        path = _write_predictions(model, structures, args, out / f"predictions_{tag}.extxyz")
        print(f"predictions of {len(structures)} structures at fidelity {args.fidelity} written to {path}")
        return
    metrics, pairs = evaluate(model, structures, args.fidelity, args.batch_size, args.device)
    print(format_table(metrics, f"{args.data} predicted at fidelity {args.fidelity}:"))
    (out / f"metrics_{tag}.json").write_text(json.dumps(metrics, indent=2))
    png = parity_plot(pairs, out / f"parity_{tag}.png", f"{Path(args.data).name} at {args.fidelity}")
    print(f"parity plot written to {png}")


def _info(args) -> None:
    from mfmlip.model.serialization import describe_model

    print(describe_model(args.model))


def build_parser() -> argparse.ArgumentParser:
    # here, not at the top: the sub-parsers import the library (torch), which the console
    # script's first process, about to re-execute under tcmalloc, does not need
    from mfmlip.cli.sample import add_parsers as add_sample_parsers
    from mfmlip.cli.simulate import add_parsers as add_simulation_parsers
    from mfmlip.cli.study import add_parsers as add_study_parsers

    parser = argparse.ArgumentParser(
        prog="mfmlip",
        description="Multi-fidelity machine-learning interatomic potentials (units: eV, Angstrom).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--data-root", help="folder data paths resolve against (else $MFMLIP_DATA, "
                   "data.root, or ../shared/data from the repository root)")
    p.add_argument("--devices", type=types.devices, help="processes per node (GPUs, or CPU processes); "
                   "overrides training.devices")
    p.add_argument("--num-nodes", type=types.positive_int, help="nodes; overrides training.num_nodes")
    p.add_argument("--strategy", help="Lightning strategy, e.g. ddp; overrides training.strategy")
    p.add_argument("--accelerator", choices=["cpu", "cuda", "gpu", "mps", "auto"],
                   help="overrides training.device (also spelt training.accelerator)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/last.ckpt "
                       "(the config may not change the model or the data)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run in output_dir (its checkpoints, logs and model.pt are deleted)")
    p.set_defaults(func=_train)

    p = sub.add_parser("prepare", help="write a config's data files into on-disk stores (HDF5), for data "
                       "larger than memory; then train from the config it writes")
    p.add_argument("config", help="YAML config file")
    p.add_argument("-o", "--output-dir", help="folder for the stores and the prepared config "
                   "(default stores/CONFIG_NAME)")
    p.add_argument("--data-root", help="folder data paths resolve against (as for train)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("evaluate", help="metrics and parity plot of a model on labelled data")
    p.add_argument("model", help="model file (model.pt) written by mfmlip train, or a universal model "
                   "such as sevenn:7net-mf-0 (the sevenn extra)")
    p.add_argument("data", help="ASE-readable file with reference energies/forces")
    p.add_argument("--fidelity", required=True, help="fidelity to predict at")
    p.add_argument("--index", type=types.ase_index, default=":", help="ASE index of frames to use (default all)")
    p.add_argument("--batch-size", type=types.positive_int, default=64)
    p.add_argument("--device", type=types.device, default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--energy-key", default="energy", help="name of the energy label in the file (default energy)")
    p.add_argument("--forces-key", default="forces", help="name of the force label in the file (default forces)")
    p.add_argument("--predictions-only", action="store_true", help="no metrics: write the predicted energies "
                   "and forces as OUTPUT_DIR/predictions_DATA_FIDELITY.extxyz (for unlabelled data)")
    p.add_argument("-o", "--output-dir", default=".", help="where metrics JSON and parity PNG go")
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("info", help="a model file's fidelities (names for --fidelity), species, cutoff, E0s")
    p.add_argument("model", help="model file (model.pt) written by mfmlip train, or a universal model "
                   "such as sevenn:7net-mf-0")
    p.set_defaults(func=_info)

    add_simulation_parsers(sub)
    add_study_parsers(sub)
    add_sample_parsers(sub)
    lammps_commands.add_parsers(sub)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind stdout (captured output)
        pass
    finally:
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run one command; ``argv=None`` (the console script) reads ``sys.argv``, may
    re-execute under tcmalloc first and otherwise tunes glibc's allocator
    (:mod:`mfmlip.cli.allocator`)."""
    if argv is None:  # before the parser: its imports (torch) are then paid once, after the re-exec
        reexec_with_tcmalloc(sys.argv[1:])
        if os.environ.get(ALLOCATOR_ENV, "glibc") == "glibc":  # no tcmalloc, or MFMLIP_ALLOCATOR=glibc
            tune_glibc_malloc()
    args = build_parser().parse_args(argv)
    from mfmlip.data.structures import DataError
    from mfmlip.training.config import ConfigError

    try:
        args.func(args)
    except BrokenPipeError:  # the reader of stdout left (`mfmlip info M | head -1`): stop quietly
        _silence_stdout()
        return 1
    except (ConfigError, DataError, OSError, FloatingPointError, ValueError) as err:
        print(f"mfmlip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, not bad input: say what, not a raw traceback
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"mfmlip {args.command}: unexpected error: {type(err).__name__}: {err} "
              f"(set {TRACEBACK_ENV}=1 to see where; please report it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
