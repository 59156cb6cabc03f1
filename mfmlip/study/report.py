"""A study's results: ``results.csv`` (one row per run), ``results.md``
(tables of mean and spread over seeds, and the data-efficiency check) and
``learning_curve.png``.

Units: energy errors in meV/atom, force errors in meV/Angstrom, on the
held-out high-level test structures.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from mfmlip.analysis.figures import new_figure, save_figure
from mfmlip.atomic_io import atomic_write
from mfmlip.study.config import SINGLE, StudyConfig

COLUMNS = ("method", "selection", "fraction", "seed", "n_high", "status", "energy_mae", "energy_rmse", "energy_max",
           "forces_mae", "forces_rmse", "forces_max", "seconds", "steps", "error")
QUANTITIES = {"energy": "meV/atom", "forces": "meV/Å"}
CLAIM = (0.1, 0.8)  # Ko & Ong: 10 % high-level data with multi-fidelity vs 80 % single-fidelity


def result_rows(plan, statuses: dict) -> list[dict]:
    """One row per grid run (the shared low-level models are not scored)."""
    rows = []
    for run in plan.runs:
        if run.fraction is None:
            continue
        st = statuses.get(run.name) or {"status": "not run"}
        m = st.get("metrics", {})
        rows.append({
            "method": run.method, "selection": run.selection, "fraction": run.fraction, "seed": run.seed, "n_high": run.n_high,
            "status": st["status"], **{c: m.get(c, "") for c in COLUMNS[6:12]},
            "seconds": round(st["seconds"], 1) if "seconds" in st else "", "steps": st.get("steps") or "",
            "error": st.get("error", ""),
        })
    return rows


def label(row: dict) -> str:
    """The method, with its selection unless the high-level subset was random."""
    return row["method"] if row["selection"] == "random" else f"{row['method']} ({row['selection']})"


def summarise(rows: list[dict], column: str) -> dict:
    """``{(label, fraction): (mean, std over seeds, n_high, n_seeds)}`` of finished runs."""
    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "done" and r[column] != "":
            groups[(label(r), r["fraction"])].append((float(r[column]), r["n_high"]))
    return {k: (np.mean([v for v, _ in g]), np.std([v for v, _ in g]), g[0][1], len(g)) for k, g in groups.items()}


def write_report(cfg: StudyConfig, plan, statuses: dict) -> Path:
    """Write results.csv, results.md and learning_curve.png into the study folder."""
    out = cfg.results_dir()
    rows = result_rows(plan, statuses)

    def _csv(fh):
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(out / "results.csv", _csv, mode="w", newline="")
    atomic_write(out / "results.md", lambda fh: fh.write(markdown(cfg, plan, rows)), mode="w")
    learning_curve(rows, out / "learning_curve.png", f"{cfg.name}: {plan.high_fidelity} test error")
    print(f"results written to {out}/results.csv, results.md, learning_curve.png", flush=True)
    return out


def _shares(sampling: dict[str, float]) -> str:
    return ", ".join(f"{name} {share:.0%}" for name, share in sampling.items())


def _budget(t) -> str:
    if not t.max_time_minutes:
        return f"{t.max_steps} optimiser steps"
    decay = ", the learning rate decaying over the minutes" if t.decay_over == "time" else ""
    return f"{t.max_time_minutes:g} min of training (or {t.max_steps} steps, whichever ends first){decay}"


def _table(rows: list[dict], column: str, methods: list[str], fractions: list[float], fmt: str = "{:.2f}") -> list[str]:
    stats = summarise(rows, column)
    n_high = {r["fraction"]: r["n_high"] for r in rows}
    lines = ["| method | " + " | ".join(f"{f:g} (n={n_high[f]})" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for method in methods:
        cells = []
        for f in fractions:
            mean, std, _, k = stats.get((method, f), (np.nan, np.nan, 0, 0))
            cells.append("failed" if k == 0 else f"{fmt.format(mean)} ± {fmt.format(std)}" if k > 1 else fmt.format(mean))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def claim_fractions(rows: list[dict]) -> tuple[float, float]:
    """10 % and 80 % of the pool (Ko & Ong), else the grid's smallest and largest fractions."""
    fractions = sorted({r["fraction"] for r in rows})
    return tuple(f if f in fractions else pick(fractions) for f, pick in zip(CLAIM, (min, max)))


def claim_check(rows: list[dict]) -> list[str]:
    """Each method at the small fraction against single-fidelity at the large one (energy MAE)."""
    low, high = claim_fractions(rows)
    stats = summarise(rows, "energy_mae")
    if (SINGLE, high) not in stats:
        return [f"(needs {SINGLE} at fraction {high:g} in the grid)"]
    ref, ref_std, ref_n, _ = stats[(SINGLE, high)]
    lines = [f"{SINGLE} at {high:g} (n={ref_n}): {ref:.2f} ± {ref_std:.2f} meV/atom.", "",
             f"| method at {low:g} | n | energy MAE | ratio to {SINGLE} at {high:g} | claim holds |", "|---|---|---|---|---|"]
    for (method, f), (mean, std, n, _) in sorted(stats.items()):
        if f == low and method != SINGLE:
            lines.append(f"| {method} | {n} | {mean:.2f} ± {std:.2f} | {mean / ref:.2f} | {'yes' if mean <= ref else 'no'} |")
    return lines


def selection_check(rows: list[dict], fractions: list[float]) -> list[str]:
    """Mean energy MAE and largest error of each non-random pick over the random pick of the same method."""
    mae, worst = summarise(rows, "energy_mae"), summarise(rows, "energy_max")
    lines = ["| method | " + " | ".join(f"{f:g}" for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
    for key in dict.fromkeys(label(r) for r in rows if r["selection"] != "random"):
        base = key.split(" (")[0]
        cells = []
        for f in fractions:
            if (key, f) in mae and (base, f) in mae:
                cells.append(f"{mae[(key, f)][0] / mae[(base, f)][0]:.2f} / {worst[(key, f)][0] / worst[(base, f)][0]:.2f}")
            else:
                cells.append("–")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def markdown(cfg: StudyConfig, plan, rows: list[dict]) -> str:
    methods = list(dict.fromkeys(label(r) for r in rows))
    fractions = sorted({r["fraction"] for r in rows})
    m, t = cfg.model, cfg.training
    lines = [
        f"# Study `{cfg.name}`: {plan.high_fidelity} test error against high-level training data", "",
        *(f"- {line}" for line in plan.report),
        f"- Scored on the same {plan.n_test} held-out {plan.high_fidelity} structures in every run; "
        "no test geometry enters any training set (low levels included).",
        f"- Columns: fraction of the {plan.n_pool}-structure pool (n = high-level structures seen, "
        f"{cfg.data.val_fraction:g} of them for validation). Mean ± std over seeds {cfg.grid.seeds}.",
        f"- Budget: {_budget(t)} per run, batch {t.batch_size}; transfer and delta spend half on a shared "
        "low-level model (one per seed) and half on the high level.",
        *([f"- Selections of the high-level subset: {', '.join(cfg.grid.selections)} (random unless named "
           "in brackets; DIRECT and narrow encode the pool with the seed's low-level model)."]
          if cfg.grid.selections != ["random"] else []),
        *([f"- Draws per level: {_shares(t.sampling)} (renormalised over each run's levels; a run of one "
           "level draws each structure once per epoch)."] if t.sampling else []),
        f"- Model: {m.channels} channels, lmax {m.lmax}, {m.num_layers} layers, cutoff {m.cutoff} Å, {m.dtype}.", "",
    ]
    if t.max_time_minutes and any(r["steps"] != "" for r in rows):
        lines += ["## optimiser steps in the budget (two-stage methods: second stage only)", "",
                  *_table(rows, "steps", methods, fractions, "{:.0f}"), ""]
    for q, unit in QUANTITIES.items():
        if any(r[f"{q}_mae"] != "" for r in rows):
            lines += [f"## {q} MAE ({unit})", "", *_table(rows, f"{q}_mae", methods, fractions), ""]
            lines += [f"## largest {q} error ({unit})", "", *_table(rows, f"{q}_max", methods, fractions), ""]
    low, high = claim_fractions(rows)
    lines += [f"## Little high-level data with help vs much without: {low:g} of the pool vs {high:g} "
              "single-fidelity (energy MAE, meV/atom)", "", *claim_check(rows), ""]
    if any(r["selection"] != "random" for r in rows):
        lines += ["## Picks against random picks of the same size (ratio of energy MAE / of largest "
                  "energy error; below 1 is better)", "", *selection_check(rows, fractions), ""]
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        lines += ["## Runs that did not finish", "", *(f"- {label(r)} f={r['fraction']:g} seed {r['seed']}: "
                                                       f"{r['status']}: {r['error']}" for r in failed), ""]
    return "\n".join(lines)


def learning_curve(rows: list[dict], path: Path, title: str) -> Path:
    """Test MAE against the number of high-level structures, one line per
    method, error bars = std over seeds; one panel per labelled quantity."""
    panels = [q for q in QUANTITIES if any(r[f"{q}_mae"] != "" for r in rows)] or ["energy"]
    fig, axes = new_figure(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, q in zip(axes[0], panels):
        stats = summarise(rows, f"{q}_mae")
        for method in dict.fromkeys(label(r) for r in rows):
            pts = sorted((n, mean, std) for (meth, _), (mean, std, n, _) in stats.items() if meth == method)
            if pts:
                n, mean, std = map(np.array, zip(*pts))
                ax.errorbar(n, mean, yerr=std, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("high-level training structures")
        ax.set_ylabel(f"test {q} MAE [{QUANTITIES[q]}]")
        ax.grid(True, which="both", alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:  # no run finished: nothing to label
        axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)
