"""``mfmlip study``: the grid of methods x high-level fractions x seeds."""

from __future__ import annotations

from mfmlip.cli import types


def _study(args) -> None:
    from mfmlip.study import load_study, run_study

    cfg = load_study(args.config)
    run_study(cfg.reduced() if args.quick else cfg, data_root=args.data_root, jobs=args.jobs)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "study", help="compare fidelity schemes and baselines against the amount of high-level data",
        description="Train every method at every high-level fraction and seed; write results.csv, "
        "results.md and learning_curve.png (errors in meV/atom and meV/Angstrom). Re-running skips "
        "finished runs and resumes interrupted ones.",
    )
    p.add_argument("config", help="study YAML file")
    p.add_argument("--quick", action="store_true", help="the reduced grid of the config's quick: section")
    p.add_argument("--jobs", type=types.positive_int,
                   help="runs at once (default: the config's jobs, else one per CPU core)")
    p.add_argument("--data-root", help="folder data paths resolve against (as for mfmlip train)")
    p.set_defaults(func=_study)
