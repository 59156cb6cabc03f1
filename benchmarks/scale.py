"""Training from on-disk stores at 10k, 100k and 1M frames: peak memory and throughput.

Stores are filled with rattled copies of the shared malonaldehyde GFN2-xTB
frames (9 atoms; positions + N(0, 0.02 A), the frame's own energy and forces:
labels for throughput and memory, not physics), written with
:class:`mfmlip.data.store.StoreWriter` into ``--work`` (never the repository).
The same 10k frames are also written as extxyz and trained from memory (the
path without stores), once more with two DDP processes of half the batch. Each case runs ``mfmlip train`` twice in a fresh process,
for ``--steps`` A and B optimiser steps of the main job's model and batch size;
throughput is ``(B - A) * batch_size`` structures over the difference of their
wall times (start-up, data preparation and test report cancel), and the peak
RSS is that of the largest process (``wait4``), DataLoader workers included.

    python benchmarks/scale.py --out docs/benchmarks/scale.json

Targets (issue 14): peak RSS at 1M <= 1.2x that at 10k; throughput from a
store with 2 workers >= 0.9x the in-memory path at 10k. The DDP row is for
correctness on a 2-core machine, not speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from ase.io import write

from mfmlip.data.store import StoreWriter
from mfmlip.data.structures import Structure, read_structures

REPO = Path(__file__).resolve().parent.parent
MODEL = {"cutoff": 5.0, "channels": 32, "lmax": 1, "num_layers": 3, "num_radial": 8,
         "fidelity_scheme": "one_hot_linear"}
BATCH = 32


def rattled(base: list[Structure], n: int, seed: int = 0):
    """``n`` copies of the base frames, in turn, with positions rattled."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        s = base[k % len(base)]
        yield Structure(s.positions + rng.normal(0.0, 0.02, s.positions.shape), s.atomic_numbers, s.cell, s.pbc,
                        s.fidelity, s.energy, s.forces, None, source=f"rattled: frame {k}", frame=k)


def build_store(path: Path, base: list[Structure], n: int) -> Path:
    if path.is_file():
        return path
    t = time.time()
    with StoreWriter(path, {"file": "rattled malonaldehyde GFN2-xTB", "keys": ["energy", "forces"]}) as w:
        for s in rattled(base, n):
            w.add(s)
        w.close()
    print(f"{path.name}: {n} frames written in {time.time() - t:.0f} s ({path.stat().st_size / 1e6:.0f} MB)",
          flush=True)
    return path


def config(work: Path, name: str, path: Path, steps: int, workers: int, devices: int = 1) -> Path:
    cfg = {
        "seed": 0, "output_dir": str(work / "runs" / name),
        "data": {"root": str(work), "files": [{"path": str(path), "split": {"train": None, "val": 256, "test": 0}}]},
        "model": MODEL,
        "training": {"batch_size": BATCH // devices, "max_steps": steps, "max_epochs": 1000,
                     "val_interval_steps": steps, "lr": 0.005, "num_workers": workers, "patience": 1000,
                     "devices": devices, "accelerator": "cpu"},
    }
    out = work / f"{name}.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def run(cfg: Path) -> dict:
    """Wall time (s) and peak RSS (MB, largest process) of ``mfmlip train --overwrite CFG``."""
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "mfmlip.cli.main", "train", str(cfg), "--overwrite"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"{cfg} failed:\n{out[-3000:]}")
    return {"wall_s": time.time() - t, "peak_rss_mb": usage.ru_maxrss / 1024}


def case(work: Path, name: str, path: Path, steps: tuple[int, int], workers: int, devices: int = 1) -> dict:
    a, b = (run(config(work, f"{name}_{s}", path, s, workers, devices)) for s in steps)
    rate = (steps[1] - steps[0]) * BATCH / (b["wall_s"] - a["wall_s"])
    row = {"case": name, "workers": workers, "devices": devices, "structures_per_s": rate,
           "peak_rss_mb": max(a["peak_rss_mb"], b["peak_rss_mb"]), "wall_s": [a["wall_s"], b["wall_s"]]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=Path("/tmp/mfmlip-scale"))
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--steps", type=int, nargs=2, default=[50, 250])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="only the store rows (e.g. peak RSS at large sizes)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "scale.json")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = read_structures(args.data / "malonaldehyde" / "GFN2-xTB.extxyz", "0:2000")
    memory = args.work / "rattled_10k.extxyz"
    if not memory.is_file():
        write(memory, [s_to_atoms(s) for s in rattled(base, 10_000)], format="extxyz")
    rows = [] if args.no_memory else [case(args.work, "memory_10k", memory, args.steps, 0)]
    for n in args.sizes:
        store = build_store(args.work / f"rattled_{n}.h5", base, n)
        rows.append(case(args.work, f"store_{n}", store, args.steps, args.workers))
    if not args.no_memory:  # the same global batch of 32 from two processes of 16 (gloo)
        rows.append(case(args.work, "memory_10k_ddp2", memory, args.steps, 0, devices=2))
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_before": os.getloadavg(),
              "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"), "batch_size": BATCH,
              "steps": args.steps, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


def s_to_atoms(s: Structure):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = Atoms(numbers=s.atomic_numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
    atoms.info["fidelity"] = s.fidelity
    atoms.calc = SinglePointCalculator(atoms, energy=s.energy, forces=s.forces)
    return atoms


if __name__ == "__main__":
    main()
