"""Where the allocator time goes: training steps of the main job's model under each allocator.

Run on demand (needs the cores to itself)::

    python benchmarks/allocator.py --steps 30 --repeats 3 -o docs/benchmarks/allocator.json

Each variant runs in its own process, interleaved with the others, on the same
batch of 32 malonaldehyde structures (GFN2-xTB energies and forces, the main
job's 32-channel model, forward + force double backward + Adam step):

* ``system``: glibc malloc as it comes (large blocks are mmap'ed and unmapped,
  so every step faults fresh zeroed pages in);
* ``mallopt``: glibc tuned in-process by :func:`mfmlip.cli.allocator.tune_glibc_malloc`;
* ``tcmalloc``: ``LD_PRELOAD`` of the system's tcmalloc, when installed.

With ``--compile`` the steps go through ``training.compile``'s graph
(:class:`mfmlip.model.compiled.CompiledPotential`) instead of the eager model.

Reported per variant: ms per step (min and median over repeats), minor page
faults per step, user and system CPU ms per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, resource, sys, time
if sys.argv[1] == "mallopt":
    from mfmlip.cli.allocator import tune_glibc_malloc
    tune_glibc_malloc()
import torch
torch.set_num_threads(int(sys.argv[3]))
from ase.io import read
from mfmlip.data.structures import structure_from_atoms
from mfmlip.model import MFPotential, ModelSpec
from mfmlip.model.inference import Predictor
frames = read(sys.argv[4], "0:32")
torch.manual_seed(0)
spec = ModelSpec(species=[1, 6, 8], fidelities=["GFN2-xTB"], channels=32, lmax=1, num_layers=3, avg_num_neighbors=8.0)
model = MFPotential(spec)
batch = Predictor(model, "GFN2-xTB").batch([structure_from_atoms(a) for a in frames])
model.train()
opt = torch.optim.Adam(model.parameters(), 1e-3)
if sys.argv[5] == "compile":
    from mfmlip.model.compiled import CompiledPotential
    predict = CompiledPotential(model)
else:
    predict = lambda b: model(b, compute_forces=True)
def step():
    out = predict(batch)
    loss = 1e-4 * out["energy"].pow(2).mean() + (out["forces"] - batch["forces"]).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(5):
    step()
n = int(sys.argv[2])
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(n):
    step()
t, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"ms_per_step": 1e3 * t / n, "minflt_per_step": (r1.ru_minflt - r0.ru_minflt) / n,
                  "user_ms_per_step": 1e3 * (r1.ru_utime - r0.ru_utime) / n,
                  "sys_ms_per_step": 1e3 * (r1.ru_stime - r0.ru_stime) / n}))
"""


def _variants() -> dict[str, dict]:
    from mfmlip.cli.allocator import find_tcmalloc

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = {"system": env, "mallopt": env}
    tcmalloc = find_tcmalloc()
    if tcmalloc:
        out["tcmalloc"] = {**env, "LD_PRELOAD": tcmalloc}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent
                                              / "shared/data/malonaldehyde/GFN2-xTB.extxyz"))
    parser.add_argument("--compile", action="store_true",
                        help="steps through training.compile's compiled graph (the first process compiles; "
                             "the others reuse Inductor's cache)")
    parser.add_argument("-o", "--output", help="JSON file for the results")
    args = parser.parse_args(argv)
    runs = {name: [] for name in _variants()}
    for _ in range(args.repeats):
        for name, env in _variants().items():
            mode = "mallopt" if name == "mallopt" else "plain"
            cmd = [sys.executable, "-c", WORKER, mode, str(args.steps), str(args.threads), args.data,
                   "compile" if args.compile else "eager"]
            done = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": str(args.threads)},
                                  capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    summary = {}
    for name, rows in runs.items():
        ms = [r["ms_per_step"] for r in rows]
        summary[name] = {"ms_min": min(ms), "ms_median": statistics.median(ms),
                         **{k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "ms_per_step"}}
    base = summary["system"]["ms_median"]
    for name, s in summary.items():
        s["speedup_vs_system"] = base / s["ms_median"]
        print(f"{name:>9}: {s['ms_median']:.1f} ms/step (min {s['ms_min']:.1f}), x{s['speedup_vs_system']:.2f}, "
              f"{s['minflt_per_step']:.0f} page faults/step, user {s['user_ms_per_step']:.1f} ms, "
              f"sys {s['sys_ms_per_step']:.1f} ms")
    if args.output:
        Path(args.output).write_text(json.dumps({"settings": vars(args), "summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
