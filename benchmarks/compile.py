"""training.compile against eager training steps, on the project's three real systems.

For each case the main job's model (32 channels, lmax 1, 3 layers, float32)
takes training steps (energy + forces loss, backward, Adam) on batches of
real frames, first eagerly, then through :class:`mfmlip.model.compiled.CompiledPotential`:

* eager and compiled milliseconds per step (median over the timed steps,
  cycling through several batches, so NaCl-water's varying edge counts
  exercise the dynamic shapes);
* the one-off cost: trace (``make_fx``) and compile (Inductor, from an empty
  cache, as on a fresh machine) seconds;
* the largest energy and force difference to the eager model on one batch;
* what a second run pays: a model of another neighbour count (as another
  dataset or split gives) traced and compiled with the cache the first left.

Run (the cores to itself): python benchmarks/compile.py --threads 2
Writes docs/benchmarks/compile_<threads>thread.json; docs/benchmarks/compile.md reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mfmlip-inductor-")  # a fresh machine's cost

import torch  # noqa: E402

from mfmlip import keys as K  # noqa: E402
from mfmlip.data.graph import collate, structure_to_graph, to_device  # noqa: E402
from mfmlip.data.structures import read_structures  # noqa: E402
from mfmlip.model import MFPotential, ModelSpec  # noqa: E402
from mfmlip.model.compiled import CompiledPotential  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# name: (file under the data root, species, structures per batch, batches cycled through)
CASES = {
    "malonaldehyde (main job)": ("malonaldehyde/GFN2-xTB.extxyz", [1, 6, 8], 32, 4),
    "ethanol": ("ethanol/PBE_train.extxyz", [1, 6, 8], 32, 4),
    "NaCl-water": ("nacl_water/revPBE0-D3.extxyz", [1, 8, 11, 17], 4, 3),
}


def batches(path: Path, size: int, count: int, cutoff: float) -> list[dict]:
    """``count`` float32 batches of ``size`` consecutive frames of ``path``."""
    frames = read_structures(path, index=f"0:{size * count}", fidelity="bench")
    return [to_device(collate([structure_to_graph(s, cutoff, 0) for s in frames[i:i + size]]), "cpu", torch.float32)
            for i in range(0, size * count, size)]


def model_for(species: list[int], data: list[dict], neighbours_factor: float = 1.0) -> MFPotential:
    edges = sum(b[K.EDGE_INDEX].shape[1] for b in data) / sum(b[K.POSITIONS].shape[0] for b in data)
    edges *= neighbours_factor
    spec = ModelSpec(species=species, fidelities=["bench"], cutoff=5.0, channels=32, lmax=1, num_layers=3,
                     num_radial=8, avg_num_neighbors=edges)
    torch.manual_seed(0)
    return MFPotential(spec).float().train()


def timed_steps(model, predict, data: list[dict], steps: int) -> tuple[list[float], float]:
    """Seconds of each of ``steps`` training steps after a first one, and the first's seconds."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 1):
        batch = data[i % len(data)]
        start = time.perf_counter()
        out = predict(batch)
        loss = ((out[K.ENERGY] - batch[K.ENERGY]) ** 2).mean() + ((out[K.FORCES] - batch[K.FORCES]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times[1:], times[0]


def run_case(name: str, root: Path, steps: int) -> dict:
    path, species, size, count = CASES[name]
    data = batches(root / path, size, count, 5.0)
    model = model_for(species, data)
    eager, _ = timed_steps(model, lambda b: model(b, compute_forces=True), data, steps)

    model = model_for(species, data)  # the same initial weights
    compiled = CompiledPotential(model)
    fast, first = timed_steps(model, compiled, data, steps)  # the first step traces and compiles
    # after the timed steps' updates: the compiled model against eager on the same weights
    check, eager_out = compiled(data[0]), model(data[0])
    difference = {k: float((check[k] - eager_out[k]).detach().abs().max()) for k in (K.ENERGY, K.FORCES)}
    trace_s, first = compiled.trace_seconds, first - compiled.trace_seconds
    other = model_for(species, data, neighbours_factor=1.1)  # a second run, on other data: the cache is warm
    start = time.perf_counter()
    second = CompiledPotential(other)(data[1])
    (second[K.ENERGY].sum() + second[K.FORCES].square().sum()).backward()  # the backward compiles at its first call
    second_run_s = time.perf_counter() - start
    out = {
        "structures_per_batch": size, "atoms_per_batch": int(data[0][K.POSITIONS].shape[0]),
        "edges_per_batch": [int(b[K.EDGE_INDEX].shape[1]) for b in data],
        "eager_ms_per_step": 1e3 * statistics.median(eager), "compiled_ms_per_step": 1e3 * statistics.median(fast),
        "trace_s": trace_s, "compile_s": first, "second_run_trace_and_compile_s": second_run_s, "steps_timed": steps,
        "max_energy_difference_eV": difference[K.ENERGY], "max_force_difference_eV_per_A": difference[K.FORCES],
    }
    out["speedup"] = out["eager_ms_per_step"] / out["compiled_ms_per_step"]
    out["break_even_steps"] = (trace_s + first) / max(1e-3 * (out["eager_ms_per_step"] - out["compiled_ms_per_step"]),
                                                       1e-9)
    print(name, json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode and case")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--data-root", default=os.environ.get("MFMLIP_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--out", help="default docs/benchmarks/compile_<threads>thread.json")
    args = p.parse_args()
    out = Path(args.out or ROOT / "docs" / "benchmarks" / f"compile_{args.threads}thread.json")
    torch.set_num_threads(args.threads)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "load_average_before": os.getloadavg()[0]}
    results = {name: run_case(name, Path(args.data_root), args.steps) for name in args.cases.split(",")}
    meta["load_average_after"] = os.getloadavg()[0]
    out.write_text(json.dumps({"meta": meta, "cases": results}, indent=1) + "\n")
    print("written", out)


if __name__ == "__main__":
    main()
