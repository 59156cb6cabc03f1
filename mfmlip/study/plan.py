"""From a study config to its runs: the held-out test set, the high-level
pool, nested subsets per seed, and one ordinary training config per run.

Every run is a plain ``mfmlip train`` config (``<run>/config.yaml``) whose data
files select frames through split files, so any cell can be re-run by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from mfmlip.data.structures import Structure, read_structures
from mfmlip.study.config import DELTA, FOUNDATION, SINGLE, TRANSFER, StudyConfig
from mfmlip.training.checks import check_fidelity_names, check_label_keys
from mfmlip.training.config import Config, ConfigError, FileConfig, SplitConfig, data_file
from mfmlip.training.data import read_entry
from mfmlip.training.rundir import earlier_run, write_run_config

LOW = "low"  # the low-level model that transfer starts from and delta corrects
MAX_EPOCHS = 1_000_000  # runs stop on training.max_steps


@dataclass
class Run:
    """One training run of the grid.

    ``method`` is a grid method or ``"low"``; ``n_high`` counts the high-level
    structures the run sees (training plus validation); ``needs`` names the
    run whose model it starts from (or encodes with); ``choose`` describes a
    DIRECT or narrow pick of the high-level subset, made when the run starts
    (:func:`mfmlip.study.select.choose_high`).
    """

    name: str
    method: str
    fraction: float | None
    seed: int
    n_high: int
    config: Config
    needs: str | None = None
    selection: str = "random"
    choose: dict | None = None

    @property
    def folder(self) -> Path:
        return Path(self.config.output_dir)


@dataclass
class Plan:
    runs: list[Run]
    high_fidelity: str
    n_test: int
    n_pool: int
    report: list[str]


class CachedReader:
    """:func:`read_structures` that parses each file once and keeps the result."""

    def __init__(self):
        self.cache: dict = {}

    def __call__(self, path, index=":", **kwargs) -> list[Structure]:
        key = (str(Path(path).resolve()), index, tuple(sorted(kwargs.items())))
        if key not in self.cache:
            self.cache[key] = read_structures(path, index, **kwargs)
        return self.cache[key]


def fingerprint(s: Structure) -> bytes:
    """Identity of a geometry across files: elements and positions rounded to 1e-4 Angstrom."""
    return s.atomic_numbers.astype(np.int64).tobytes() + (np.round(s.positions, 4) + 0.0).tobytes()


def _count(spec: float | int, n: int) -> int:
    return int(spec) if isinstance(spec, int) else max(1, round(spec * n))


def write_split(path: Path, **parts) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({k: [int(i) for i in v] for k, v in parts.items()}))
    return str(path.resolve())


def _entry(fc: FileConfig, split_file: str) -> FileConfig:
    return fc.model_copy(update={"split": SplitConfig(file=split_file)})


def _only_fidelity(structures: list[Structure], where: str) -> str:
    names = sorted({s.fidelity for s in structures})
    if len(names) != 1:
        raise ConfigError(f"{where}: expected one fidelity, found {names or 'no frames'}")
    return names[0]


def plan_study(cfg: StudyConfig, root: Path, reader=read_structures) -> Plan:
    """Draw the test set and pool, write the split files, and build every run.

    The test set (``data.test``) is drawn first with ``data.split_seed``;
    low-level frames with the same geometry as a test structure are removed
    too, so no test structure enters any training set. For each seed, the
    runs at growing fractions use nested subsets of the pool.

    Raises
    ------
    ConfigError, DataError
        Missing files, label keys or fidelity names that match nothing,
        several fidelities in the high file, or an empty pool.
    """
    out = cfg.results_dir().resolve()
    d = cfg.data
    every, high, _ = read_entry(d.high, d, root, reader)
    check_label_keys(d.high, data_file(root, d.high.path), "data.high", every)
    high_fidelity = _only_fidelity(high, f"data.high ({d.high.path})")
    rng = np.random.default_rng(d.split_seed)
    order = rng.permutation(len(high))
    n_test = _count(d.test, len(high))
    test = [high[i] for i in order[:n_test]]
    pool = np.array([high[i].frame for i in order[n_test:]][: d.pool])
    if len(pool) < 2:
        raise ConfigError(f"data.high ({d.high.path}): {len(pool)} structures left for training after the test set")
    held_out = {fingerprint(s) for s in test}
    report = [f"high level {high_fidelity}: {len(high)} frames, test {n_test}, training pool {len(pool)}"]

    low_entries, low_fidelities = [], []
    for k, fc in enumerate(d.low):
        every, kept, _ = read_entry(fc, d, root, reader)
        check_label_keys(fc, data_file(root, fc.path), f"data.low[{k}]", every)
        low_fidelities.append(_only_fidelity(kept, f"data.low[{k}] ({fc.path})"))
        usable = rng.permutation([s.frame for s in kept if fingerprint(s) not in held_out])[: d.low_max]
        n_val = _count(d.low_val, len(usable))
        split = write_split(out / "splits" / f"low_{k}.yaml", train=usable[n_val:], val=usable[:n_val])
        low_entries.append(_entry(fc, split))
        report.append(
            f"low level {low_fidelities[-1]}: {len(kept)} frames, {len(kept) - len(usable)} unused "
            f"({sum(fingerprint(s) in held_out for s in kept)} share a test geometry), train {len(usable) - n_val}, val {n_val}"
        )
    base_fidelity = cfg.options.base_fidelity or low_fidelities[0]
    if base_fidelity not in low_fidelities:
        raise ConfigError(f"options.base_fidelity {base_fidelity!r}: the low levels are {low_fidelities}")
    for key in ("fidelity_weights", "sampling"):
        check_fidelity_names(getattr(cfg.training, key), [*low_fidelities, high_fidelity], f"training.{key}")
    levels = (low_fidelities, high_fidelity)

    runs = []
    for seed in cfg.grid.seeds:
        low_name = f"{LOW}/seed{seed}"
        if {TRANSFER, DELTA} & set(cfg.grid.methods) or set(cfg.grid.selections) - {"random"}:
            runs.append(Run(low_name, LOW, None, seed, 0, _config(
                cfg, out / "runs" / low_name, low_entries, cfg.options.low_scheme, seed, 0.5, root,
                low_fidelities)))
        order = np.random.default_rng(seed).permutation(pool)
        for selection in cfg.grid.selections:
            for fraction in cfg.grid.fractions:
                runs += _fraction_runs(cfg, out, selection, fraction, seed, order, test, low_entries, root,
                                       base_fidelity, low_name, levels)
    return Plan(runs, high_fidelity, n_test, len(pool), report)


def _fraction_runs(cfg, out, selection, fraction, seed, order, test, low_entries, root, base_fidelity, low_name,
                   levels):
    """The runs of every method at one fraction and seed. Random picks are
    nested across fractions; DIRECT and narrow picks are made when the run
    starts, with the seed's low-level model as encoder."""
    d = cfg.data
    n = max(2, round(fraction * len(order)))
    n_val = _count(d.val_fraction, n)
    tag = f"f{fraction:g}_seed{seed}" if selection == "random" else f"{selection}_f{fraction:g}_seed{seed}"
    split = out / "splits" / f"high_{tag}.yaml"
    choose = None
    if selection == "random":
        write_split(split, train=order[n_val:n], val=order[:n_val], test=[s.frame for s in test])
    else:
        choose = {"selection": selection, "n": n, "n_val": n_val, "seed": seed, "pool": [int(i) for i in order],
                  "test": [s.frame for s in test], "split": str(split.resolve()), "fidelity": base_fidelity,
                  "encoder": str(out / "runs" / low_name / "model.pt"),
                  "narrow_share": cfg.options.narrow_share, "direct": cfg.options.direct}
    high_entry = _entry(d.high, str(split.resolve()))
    runs = []
    for method in cfg.grid.methods:
        name = f"{method}/{tag}"
        config = _method_run(cfg, method, out / "runs" / name, high_entry, low_entries, seed, root, base_fidelity,
                             low_name, levels)
        from_low = method != FOUNDATION and (config.training.init_from or config.training.delta_from)
        starts_from_low = from_low or choose  # a DIRECT or narrow pick encodes with the low-level model
        runs.append(Run(name, method, fraction, seed, n, config, low_name if starts_from_low else None,
                        selection, choose))
    return runs


def _method_run(cfg, method, folder, high_entry, low_entries, seed, root, base_fidelity, low_name, levels):
    """The config of one run; ``levels`` is (low fidelities, high fidelity). The
    two-stage methods' second stage (and the low-level run they start from)
    get half the budget each."""
    low_model = str(cfg.results_dir().resolve() / "runs" / low_name / "model.pt")
    high = [levels[1]]
    if method == SINGLE:
        return _config(cfg, folder, [high_entry], cfg.model.fidelity_scheme, seed, 1.0, root, high)
    if method == TRANSFER:
        return _config(cfg, folder, [high_entry], cfg.model.fidelity_scheme, seed, 0.5, root, high,
                       init_from=low_model, new_fidelity_like=base_fidelity, freeze=cfg.options.transfer_freeze)
    if method == DELTA:
        return _config(cfg, folder, [high_entry], cfg.model.fidelity_scheme, seed, 0.5, root, high,
                       delta_from=low_model, delta_fidelity=base_fidelity)
    if method == FOUNDATION:
        o = cfg.options
        return _config(cfg, folder, [*low_entries, high_entry], cfg.model.fidelity_scheme, seed, 1.0, root,
                       [*levels[0], *high], init_from=o.foundation, new_fidelity_like=o.foundation_like,
                       freeze=o.foundation_freeze, replay=o.foundation_replay)
    return _config(cfg, folder, [*low_entries, high_entry], method, seed, 1.0, root, [*levels[0], *high])


def _config(cfg: StudyConfig, folder: Path, files, scheme: str, seed: int, share: float, root: Path,
            fidelities: list[str], **training) -> Config:
    """One run's training config, written to ``folder/config.yaml`` unless the
    folder holds a started run (whose stored config its resume compares with).
    ``share`` of the budget (``training.max_steps``, and ``max_time_minutes``
    if set). ``fidelities`` are the run's data's: ``fidelity_weights`` and
    ``sampling`` keep only those (no shares with one fidelity left), and a
    ``monitor`` of another fidelity becomes ``val_loss``."""
    t = cfg.training
    weights, shares = ({name: v for name, v in d.items() if name in fidelities}
                       for d in (t.fidelity_weights, t.sampling))
    steps = max(1, int(t.max_steps * share))
    budget = {"max_steps": steps}
    if t.max_time_minutes:
        budget["max_time_minutes"] = t.max_time_minutes * share
    if t.monitor != "val_loss" and t.monitor.split("/", 1)[1] not in fidelities:
        budget["monitor"] = "val_loss"
    run = Config(
        seed=seed,
        output_dir=str(folder),
        data={"root": str(Path(root).resolve()), "fidelity_key": cfg.data.fidelity_key,
              "allow_missing_labels": cfg.data.allow_missing_labels, "files": files},
        model=cfg.model.model_copy(update={"fidelity_scheme": scheme}),
        training=t.model_copy(update={
            **budget, "max_epochs": MAX_EPOCHS,
            "val_interval_steps": t.val_interval_steps or max(1, steps // 20), "fidelity_weights": weights,
            "sampling": shares if len(shares) > 1 else {}, **training,
        }),
    )
    folder.mkdir(parents=True, exist_ok=True)
    if not earlier_run(folder):
        write_run_config(run, folder, root)
    return Config.model_validate(run.model_dump(exclude_unset=True))  # what the study set, as a user would
