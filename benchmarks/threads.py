"""Calculator calls on small and large systems, by intra-op thread count, on an idle
machine and with a competing process (issue 17, target 5).

For each system the main job's model size (32 channels, lmax 1, 3 layers,
float32, untrained: the cost does not depend on the weights) is wrapped in
:class:`mfmlip.simulation.MFCalculator` and asked for energy and forces of
a rattled copy at every call, as an MD step does. Each setting reports the
median and the 90th percentile milliseconds per call over ``--calls`` calls:

* ``threads``: 1, 2 (this machine's cores) and ``auto`` (the calculator's
  default, :func:`mfmlip.model.inference.threads_for`);
* ``competitor``: none, or one other process keeping one core busy with
  single-thread float32 matrix products (a training run, an editor's build).

Run (the cores to itself): python benchmarks/threads.py
Writes docs/benchmarks/threads.json; docs/benchmarks/threads.md reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk
from ase.io import read

from mfmlip.model import MFPotential, ModelSpec
from mfmlip import MFCalculator

ROOT = Path(__file__).resolve().parent.parent
COMPETITOR = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\n"
              "while True:\n    a = torch.tanh(a @ a)")


def systems(data_root: Path) -> dict:
    """name -> ase.Atoms: a 9-atom molecule, NaCl-water (184 atoms), silicon cells."""
    return {
        "malonaldehyde (9 atoms)": read(data_root / "malonaldehyde/GFN2-xTB.extxyz", index=0),
        "silicon 64": bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 2),
        "NaCl-water (184 atoms)": read(data_root / "nacl_water/MP2.extxyz", index=0),
        "silicon 512": bulk("Si", "diamond", a=5.43, cubic=True) * (4, 4, 4),
    }


def calculator(atoms, threads) -> MFCalculator:
    species = sorted(set(atoms.numbers.tolist()))
    spec = ModelSpec(species=species, fidelities=["bench"], cutoff=5.0, channels=32, lmax=1, num_layers=3,
                     num_radial=8, avg_num_neighbors=20.0)
    torch.manual_seed(0)
    return MFCalculator(MFPotential(spec).float(), fidelity="bench", threads=threads)


def time_calls(atoms, threads, calls: int) -> dict:
    calc, rng = calculator(atoms, threads), np.random.default_rng(0)
    work = atoms.copy()
    work.calc = calc
    seconds = []
    for k in range(calls + 5):  # 5 warm-up calls
        work.positions = atoms.positions + rng.normal(0.0, 0.02, atoms.positions.shape)
        start = time.perf_counter()
        work.get_forces()
        if k >= 5:
            seconds.append(time.perf_counter() - start)
    ms = sorted(1000 * s for s in seconds)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "benchmarks" / "threads.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    results = {"machine": platform.processor() or platform.machine(), "cores": cores, "torch": torch.__version__,
               "load_average_at_start": os.getloadavg()[0], "calls": args.calls, "rows": []}
    for competing in (False, True):
        rival = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if competing else None
        try:
            time.sleep(2.0 if competing else 0.0)
            for name, atoms in systems(args.data_root).items():
                for threads in (1, cores, None):
                    row = {"system": name, "n_atoms": len(atoms), "competitor": competing,
                           "threads": threads or "auto", **time_calls(atoms, threads, args.calls)}
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
        finally:
            if rival is not None:
                rival.kill()
    torch.set_num_threads(cores)
    args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
