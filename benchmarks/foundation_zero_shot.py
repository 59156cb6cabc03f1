"""Zero-shot accuracy and cost of a universal model (default sevenn:7net-mf-0) on the shared data.

Energy MAE is given raw, after removing the mean per-atom offset, and after
removing per-element offsets fitted by least squares on the same structures
(the codes' total energies have different references). Wall time per
structure: forces at batch size 1, on the threads given by OMP_NUM_THREADS.

Run: OMP_NUM_THREADS=1 python benchmarks/foundation_zero_shot.py [--model NAME] [-o docs/foundation/zero_shot.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from mfmlip.analysis.evaluate import evaluate
from mfmlip.data.e0 import composition_matrix
from mfmlip.data.structures import read_structures
from mfmlip.model.inference import Predictor, resolve_model

# (file, fidelity, frames): a strided subset where the full file costs too much on a shared CPU
CHECKS = [("nacl_water/r2SCAN.extxyz", "R2SCAN", "::9"), ("silicon/PBE_test.extxyz", "PBE", ":")]


def energy_errors(structures, pairs) -> dict:
    """Per-atom energy MAE (meV/atom) raw, mean-offset removed and per-element-offset
    removed, from :func:`evaluate`'s energy pairs (per atom, in structure order)."""
    pred, ref = pairs["energy"]
    n = np.array([s.n_atoms for s in structures])
    diff = (ref - pred) * n
    species = sorted({int(z) for s in structures for z in s.atomic_numbers})
    comp = composition_matrix(structures, species)
    offsets, *_ = np.linalg.lstsq(comp, diff, rcond=None)
    per_atom = diff / n
    return {
        "energy_mae_raw": float(np.abs(per_atom).mean() * 1000),
        "energy_mae_mean_offset_removed": float(np.abs(per_atom - per_atom.mean()).mean() * 1000),
        "energy_mae_element_offsets_removed": float(np.abs((diff - comp @ offsets) / n).mean() * 1000),
        "element_offsets_eV": {str(z): float(o) for z, o in zip(species, offsets)},
    }


def wall_time(model, structures, fidelity, repeats: int = 3) -> float:
    """Median seconds per structure for energy + forces, batch size 1 (after one warm-up)."""
    predictor = Predictor(model, fidelity)
    batches = [predictor.batch([s]) for s in structures[: repeats + 1]]
    predictor(batches[0])
    times = []
    for b in batches[1:]:
        t = time.perf_counter()
        predictor(b)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sevenn:7net-mf-0")
    parser.add_argument("--data-root", default=os.environ.get("MFMLIP_DATA", "../shared/data"))
    parser.add_argument("-o", "--output", default="docs/foundation/zero_shot.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = resolve_model(args.model)
    results = {"model": args.model, "threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()[0]}
    for path, fidelity, index in CHECKS:
        structures = read_structures(Path(args.data_root) / path, index)
        metrics, pairs = evaluate(model, structures, fidelity, batch_size=8)
        row = {"fidelity": fidelity, "index": index, "structures": len(structures),
               "forces_mae_meV_per_A": next(iter(metrics.values()))["forces_mae"],
               **energy_errors(structures, next(iter(pairs.values()))),
               "seconds_per_structure": wall_time(model, structures, fidelity),
               "atoms_per_structure": float(np.mean([s.n_atoms for s in structures]))}
        results[path] = row
        print(path, json.dumps(row), flush=True)
    results["load_average_at_end"] = os.getloadavg()[0]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
