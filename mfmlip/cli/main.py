"""The ``mfmlip`` command line: ``train``, ``evaluate``, ``study``, and the simulation and
analysis commands of :mod:`mfmlip.cli.simulate` (``relax``, ``eos``, ``md``,
``rdf``, ``adf``, ``coordination``)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from mfmlip.cli.allocator import reexec_with_tcmalloc
from mfmlip.cli.sample import add_parsers as add_sample_parsers
from mfmlip.cli.simulate import add_parsers as add_simulation_parsers
from mfmlip.cli.study import add_parsers as add_study_parsers


def _train(args) -> None:
    from mfmlip.training.run import train

    train(args.config, data_root=args.data_root, resume=args.resume)


def _evaluate(args) -> None:
    from mfmlip.analysis.evaluate import evaluate, parity_plot
    from mfmlip.analysis.metrics import format_table
    from mfmlip.data.structures import read_structures
    from mfmlip.model.serialization import load_model

    model = load_model(args.model, device=args.device)
    model.fidelity_index(args.fidelity)  # clear error before reading data
    structures = read_structures(args.data, args.index, fidelity=args.fidelity)
    metrics, pairs = evaluate(model, structures, args.fidelity, args.batch_size, args.device)
    print(format_table(metrics, f"{args.data} predicted at fidelity {args.fidelity}:"))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(args.data).stem}_{args.fidelity}")
    (out / f"metrics_{tag}.json").write_text(json.dumps(metrics, indent=2))
    png = parity_plot(pairs, out / f"parity_{tag}.png", f"{Path(args.data).name} at {args.fidelity}")
    print(f"parity plot written to {png}")


def _info(args) -> None:
    from mfmlip.model.serialization import describe_model

    print(describe_model(args.model))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mfmlip",
        description="Multi-fidelity machine-learning interatomic potentials (units: eV, Angstrom).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--data-root", help="folder data paths resolve against (else $MFMLIP_DATA, "
                   "data.root, or ../shared/data from the repository root)")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/last.ckpt")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="metrics and parity plot of a model on labelled data")
    p.add_argument("model", help="model file (model.pt) written by mfmlip train")
    p.add_argument("data", help="ASE-readable file with reference energies/forces")
    p.add_argument("--fidelity", required=True, help="fidelity to predict at")
    p.add_argument("--index", default=":", help="ASE index of frames to use (default all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--output-dir", default=".", help="where metrics JSON and parity PNG go")
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("info", help="a model file's fidelities (names for --fidelity), species, cutoff, E0s")
    p.add_argument("model", help="model file (model.pt) written by mfmlip train")
    p.set_defaults(func=_info)

    add_simulation_parsers(sub)
    add_study_parsers(sub)
    add_sample_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; ``argv=None`` (the console script) reads ``sys.argv`` and may
    re-execute under tcmalloc first (:mod:`mfmlip.cli.allocator`)."""
    args = build_parser().parse_args(argv)
    if argv is None:
        reexec_with_tcmalloc(sys.argv[1:])
    from mfmlip.data.structures import DataError
    from mfmlip.training.config import ConfigError

    try:
        args.func(args)
    except (ConfigError, DataError, OSError, FloatingPointError, ValueError) as err:
        print(f"mfmlip {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
