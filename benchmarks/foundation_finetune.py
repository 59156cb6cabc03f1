"""Scores of the fine-tuned universal models (examples/foundation/*.yaml) for docs/foundation.

* start: the model before any training step (the new fidelity a copy of R2SCAN
  with its E0 fitted), scored on each config's test split;
* forgetting: energy and force MAE of each fine-tuned model against the
  original sevenn:7net-mf-0 at R2SCAN and PBE, on held-out geometries (the
  first MP2 test boxes of NaCl-water, which no run trained on, and silicon
  PBE test cells, far from the fine-tuning data);
* each run's test metrics and wall times, from its run directory and log.

Run after the fine-tuning runs: OMP_NUM_THREADS=1 python benchmarks/foundation_finetune.py
The equal-wall-time runs of docs/foundation (four NaCl-water levels, from-scratch references):
OMP_NUM_THREADS=1 python benchmarks/foundation_finetune.py --runs /work/bg15/runs \
    --logs "/work/bg15/{name}.log" --summarise nacl_water_scratch nacl_water_4levels \
    nacl_water_4levels_replay malon_main malon_ft \
    --forgetting nacl_water_4levels nacl_water_4levels_replay --no-start -o docs/foundation/finetune_4levels.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from mfmlip import keys as K
from mfmlip.analysis.evaluate import evaluate
from mfmlip.data.structures import read_structures
from mfmlip.model.inference import Predictor, resolve_model
from mfmlip.training.config import load_config, resolve_data_root
from mfmlip.training.data import prepare_data
from mfmlip.training.run import _init_from_model, read_metrics

CONFIGS = {"malonaldehyde": "examples/foundation/malonaldehyde.yaml",
           "nacl_water": "examples/foundation/nacl_water.yaml",
           "nacl_water_replay": "examples/foundation/nacl_water_replay.yaml",
           "nacl_water_4levels": "examples/foundation/nacl_water_4levels.yaml",
           "nacl_water_4levels_replay": "examples/foundation/nacl_water_4levels_replay.yaml"}
FORGETTING_RUNS = ("nacl_water", "nacl_water_replay")
SCRATCH = "examples/nacl_water.yaml"  # the from-scratch model whose MP2 test boxes all NaCl-water runs share
ORIGINAL = "sevenn:7net-mf-0"


def predictions(model, structures, fidelity) -> tuple[np.ndarray, np.ndarray]:
    """Energies per atom (n,) eV/atom and forces (n_atoms_total, 3) eV/A."""
    energies, forces = [], []
    for _, batch, pred in Predictor(model, fidelity).predict(structures, 4):
        energies.append((pred[K.ENERGY] / batch[K.N_ATOMS]).double().numpy())
        forces.append(pred[K.FORCES].double().numpy())
    return np.concatenate(energies), np.concatenate(forces)


def start_scores(root: Path) -> dict:
    """Test metrics of each config's model before training (after the E0 fit)."""
    out = {}
    for name in ("malonaldehyde", "nacl_water"):
        cfg = load_config(CONFIGS[name])
        data = prepare_data(cfg, resolve_data_root(cfg, root))
        started = time.time()
        model, _ = _init_from_model(cfg, data)
        metrics, _ = evaluate(model.float(), data.splits["test"], batch_size=16)
        out[name] = {"test_metrics": metrics, "seconds": time.time() - started}
        print(name, "start", json.dumps(metrics), flush=True)
    return out


def same_test_boxes(root: Path, names: list[str]) -> dict:
    """Whether each NaCl-water config's test split holds the positions of the from-scratch one's."""
    def positions(config):
        cfg = load_config(config)
        return [s.positions for s in prepare_data(cfg, resolve_data_root(cfg, root)).splits["test"]]

    ref = positions(SCRATCH)
    return {name: all(np.array_equal(a, b) for a, b in zip(positions(CONFIGS[name]), ref, strict=True))
            for name in names}


def forgetting(root: Path, runs: Path, n_boxes: int, n_si: int, names: list[str]) -> dict:
    cfg = load_config(CONFIGS["nacl_water"])
    data = prepare_data(cfg, resolve_data_root(cfg, root))
    held = {"nacl_water MP2 test boxes": data.splits["test"][:n_boxes],
            "silicon PBE test cells": read_structures(root / "silicon/PBE_test.extxyz", f":{n_si}")}
    original = resolve_model(ORIGINAL)
    models = {name: resolve_model(runs / name / "model.pt") for name in names
              if (runs / name / "model.pt").is_file()}
    out = {}
    for group, structures in held.items():
        for fidelity in ("R2SCAN", "PBE"):
            e_ref, f_ref = predictions(original, structures, fidelity)
            for name, model in models.items():
                e, f = predictions(model, structures, fidelity)
                row = {"energy_mae_meV_per_atom": float(np.abs(e - e_ref).mean() * 1000),
                       "forces_mae_meV_per_A": float(np.abs(f - f_ref).mean() * 1000), "structures": len(structures)}
                out.setdefault(name, {}).setdefault(group, {})[fidelity] = row
                print(name, group, fidelity, json.dumps(row), flush=True)
    return out


def run_summary(runs: Path, names: list[str], logs: str) -> dict:
    """Test metrics, training steps and total time of each run (``logs``: its log, with ``{name}``)."""
    out = {}
    for name in names:
        folder = runs / name
        metrics = folder / "test_metrics.json"
        log = Path(logs.format(name=name))
        text = log.read_text() if log.is_file() else ""
        total = re.findall(r"total time (\d+) s", text)
        replay = re.findall(r"replay: .* in (\d+) s", text)
        out[name] = {"test_metrics": json.loads(metrics.read_text()) if metrics.is_file() else None,
                     "total_seconds": int(total[-1]) if total else None,
                     "replay_labelling_seconds": int(replay[-1]) if replay else None,
                     "steps": _steps(folder)}
    return out


def _steps(folder: Path) -> int | None:
    """The last optimiser step logged by the run."""
    steps = [int(row["step"]) for row in read_metrics(folder) if row.get("step")]
    return max(steps) if steps else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("MFMLIP_DATA", "../shared/data"))
    parser.add_argument("--runs", default="runs/foundation")
    parser.add_argument("--boxes", type=int, default=4)
    parser.add_argument("--si", type=int, default=3)
    parser.add_argument("--logs", default="/work/bg/foundation_{name}.log", help="each run's log, with {name}")
    parser.add_argument("--summarise", nargs="+", default=list(CONFIGS), help="run folders to summarise")
    parser.add_argument("--forgetting", nargs="+", default=list(FORGETTING_RUNS), help="runs scored for forgetting")
    parser.add_argument("--no-start", action="store_true", help="skip the scores before training")
    parser.add_argument("-o", "--output", default="docs/foundation/finetune.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    root, runs = Path(args.data_root), Path(args.runs)
    results = {"load_average_at_start": os.getloadavg()[0], "runs": run_summary(runs, args.summarise, args.logs),
               "same_test_boxes_as_" + SCRATCH: same_test_boxes(root, [n for n in CONFIGS if n.startswith("nacl")]),
               "forgetting_vs_original": forgetting(root, runs, args.boxes, args.si, args.forgetting)}
    if not args.no_start:
        results["before_training"] = start_scores(root)
    results["load_average_at_end"] = os.getloadavg()[0]
    Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
