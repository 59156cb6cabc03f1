"""Harness shared by the benchmark workers (mfmlip and the peers).

Each worker runs in its own interpreter (the peers in their own virtual
environments), so this module uses only the standard library, numpy, ase and
torch, which every environment has. A worker defines an adapter (how to build
the code's model at the matched size, turn ``ase.Atoms`` into its batches,
compute energy and forces, and make its ASE calculator) and calls
:func:`main`; everything else (data selection, reference energies, loss,
optimiser, timing, memory) is here, identical for every code.

The task comes as one JSON argument; the result is printed as one line
``BENCH_JSON {...}`` on stdout. It names the malloc actually mapped into the
process (``malloc``: tcmalloc when the driver preloaded it, else glibc). With
``"compile": true`` in the task the adapter takes the code's compiled path
(``Adapter.compile``); every result has ``first_call_s``, the seconds of the
first warm-up call (for a compiled path: the trace and compile that happen in
it), and ``one_off``, the adapter's other one-off seconds (e.g. an
ahead-of-time compile when the calculator is made).

Memory is the resident set size of the worker process, read from
``/proc/self/status``: ``VmRSS`` when the model, data and optimiser are ready
(the baseline) and ``VmHWM`` (peak RSS) over the warm-up and timed steps,
after resetting the peak by writing ``5`` to ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

import numpy as np

# ---------------------------------------------------------------------------
# process-level measurements


def rss_mb() -> dict:
    """Current (VmRSS) and peak (VmHWM) resident set size of this process, MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024.0
    return {"rss": out.get("VmRSS", float("nan")), "hwm": out.get("VmHWM", float("nan"))}


def loaded_malloc() -> str:
    """File name of the malloc replacement mapped into this process (tcmalloc, jemalloc), else "glibc"."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "tcmalloc" in path or "jemalloc" in path:
                    return os.path.basename(path)
    except OSError:
        pass
    return "glibc"


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def summary(values: list[float]) -> dict:
    v = sorted(values)
    return {"median": float(np.median(v)), "min": float(v[0]), "max": float(v[-1]), "n": len(v)}


# ---------------------------------------------------------------------------
# data


def read_frames(path: str, indices: list[int] | None):
    from ase.io import read

    frames = read(path, ":")
    return frames if indices is None else [frames[i] for i in indices]


def labels(atoms) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (eV/Angstrom) of a frame of the shared data."""
    return float(atoms.get_potential_energy()), np.asarray(atoms.get_forces(), dtype=np.float64)


def fit_e0(frames, species: list[int]) -> np.ndarray:
    """Per-element reference energies by least squares on composition (minimum norm)."""
    counts = np.array([[np.sum(a.numbers == z) for z in species] for a in frames], dtype=np.float64)
    energies = np.array([labels(a)[0] for a in frames])
    e0, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return e0


def avg_neighbors(frames, cutoff: float) -> float:
    from ase.neighborlist import neighbor_list

    n_edges = sum(len(neighbor_list("i", a, cutoff)) for a in frames)
    return n_edges / max(sum(len(a) for a in frames), 1)


def prepare(task: dict) -> dict:
    """Frames, species and the statistics every code gets (the same numbers).

    Energies are made relative to the least-squares E0 of the statistics
    frames, so the models carry no reference energies of their own.
    """
    frames = read_frames(task["data"], task.get("frames"))
    stats_frames = read_frames(task["data"], task["stats_frames"]) if task.get("stats_frames") else frames
    species = sorted({int(z) for a in stats_frames + frames for z in a.numbers})
    e0 = fit_e0(stats_frames, species)
    ref = dict(zip(species, e0))

    def relative(a):
        b = a.copy()
        e, f = labels(a)
        b.info["bench_energy"] = e - sum(ref[int(z)] for z in a.numbers)
        b.arrays["bench_forces"] = f
        return b

    frames = [relative(a) for a in frames]
    rel = [relative(a) for a in stats_frames]
    forces = np.concatenate([a.arrays["bench_forces"].ravel() for a in rel])
    shift = float(np.mean([a.info["bench_energy"] / len(a) for a in rel]))
    return {
        "frames": frames,
        "species": species,
        "e0": e0.tolist(),
        "scale": float(np.sqrt(np.mean(forces**2))),  # eV/Angstrom: RMS training force
        "shift": shift,  # eV/atom: mean residual energy per atom (about 0 after the E0 fit)
        "avg_num_neighbors": avg_neighbors(rel, task["model"]["cutoff"]),
    }


def batches_of(frames, size: int) -> list[list]:
    return [frames[i : i + size] for i in range(0, len(frames) - size + 1, size)]


# ---------------------------------------------------------------------------
# the adapter interface (what every worker implements)


class Adapter:
    """Subclass per code. ``model_cfg`` has cutoff, channels, lmax, layers."""

    name = "?"
    compile = False  # the code's compiled path (set from the task by main)
    task = "?"  # the task's name (set by main): a compiled path may differ for training and inference

    def __init__(self):
        self.one_off = {}  # one-off seconds outside the timed calls (e.g. an ahead-of-time compile), by name

    def version(self) -> str:
        raise NotImplementedError

    def build(self, species: list[int], stats: dict, model_cfg: dict):
        """A float32 model at the matched size, in training mode."""
        raise NotImplementedError

    def describe(self, model) -> str:
        """Hidden irreps or whatever identifies the architecture size."""
        return ""

    def batch(self, frames, model, stats: dict):
        """Frames (with ``info['bench_energy']`` and ``arrays['bench_forces']``) to one batch."""
        raise NotImplementedError

    def predict(self, model, batch, training: bool):
        """(energy (n_graphs,), forces (n_atoms, 3), n_atoms (n_graphs,), energy label, forces label);
        with ``training`` the forces keep the graph for a double backward."""
        raise NotImplementedError

    def calculator(self, model, stats: dict, workdir: str):
        """The code's own ASE calculator for this model."""
        raise NotImplementedError


def loss_fn(pred, weights=(10.0, 1.0)):
    """Same loss for every code: w_E * MSE(energy per atom) + w_F * MSE(force components)."""
    energy, forces, n_atoms, e_ref, f_ref = pred
    e_term = (((energy - e_ref) / n_atoms) ** 2).mean()
    f_term = ((forces - f_ref) ** 2).mean()
    return weights[0] * e_term + weights[1] * f_term


# ---------------------------------------------------------------------------
# tasks


def _timed(fn, warmup: int, reps: int, per_rep: int) -> tuple[list[float], dict]:
    """Run ``fn`` ``warmup`` times, then ``reps`` repetitions of ``per_rep`` calls.

    Returns the seconds per call of each repetition and the memory record.
    """
    mem = {"rss_base_mb": rss_mb()["rss"], "peak_reset": reset_peak_rss()}
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        if i == 0:
            mem["first_call_s"] = time.perf_counter() - t0  # a compiled path traces and compiles here
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(per_rep):
            fn()
        times.append((time.perf_counter() - t0) / per_rep)
    mem["rss_peak_mb"] = rss_mb()["hwm"]
    mem["rss_step_mb"] = mem["rss_peak_mb"] - mem["rss_base_mb"]
    return times, mem


def task_train(adapter: Adapter, task: dict, torch) -> dict:
    data = prepare(task)
    model = adapter.build(data["species"], data, task["model"])
    info = _model_info(adapter, model)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [adapter.batch(b, model, data) for b in batches_of(data["frames"], task["batch_size"])]
    state = {"i": 0}

    def step():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(adapter.predict(model, b, training=True))
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")

    times, mem = _timed(step, task["warmup"], task["reps"], task["per_rep"])
    per_structure = [t / task["batch_size"] for t in times]
    return {
        "unit": "structures/s",
        "throughput": summary([1.0 / t for t in per_structure]),
        "seconds_per_step": summary(times),
        "n_batches": len(batches),
        "n_atoms_per_batch": [sum(len(a) for a in b) for b in batches_of(data["frames"], task["batch_size"])][:3],
        **mem,
        **info,
    }


def task_infer_batch(adapter: Adapter, task: dict, torch) -> dict:
    data = prepare(task)
    model = adapter.build(data["species"], data, task["model"])
    info = _model_info(adapter, model)
    model.eval()
    batches = [adapter.batch(b, model, data) for b in batches_of(data["frames"], task["batch_size"])]
    state = {"i": 0}

    def step():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        energy, forces, *_ = adapter.predict(model, b, training=False)
        forces.detach().sum().item()

    times, mem = _timed(step, task["warmup"], task["reps"], task["per_rep"])
    return {
        "unit": "structures/s",
        "throughput": summary([task["batch_size"] / t for t in times]),
        **mem,
        **info,
    }


def task_infer_calc(adapter: Adapter, task: dict, torch) -> dict:
    import tempfile

    data = prepare(task)
    model = adapter.build(data["species"], data, task["model"])
    info = _model_info(adapter, model)
    model.eval()
    atoms = data["frames"][0].copy()
    workdir = tempfile.mkdtemp(prefix=f"bench-{adapter.name}-")
    atoms.calc = adapter.calculator(model, data, workdir)
    pos0 = atoms.positions.copy()
    rng = np.random.default_rng(0)

    def step():
        # a new geometry every call, as in MD: the neighbour list and graph are rebuilt
        atoms.positions = pos0 + rng.normal(0.0, 0.01, pos0.shape)
        f = atoms.get_forces()
        if not np.all(np.isfinite(f)):
            raise FloatingPointError("non-finite forces")

    times, mem = _timed(step, task["warmup"], task["reps"], task["per_rep"])
    return {
        "unit": "evaluations/s",
        "throughput": summary([1.0 / t for t in times]),
        "n_atoms": len(atoms),
        "calculator": type(atoms.calc).__module__ + "." + type(atoms.calc).__name__,
        **mem,
        **info,
    }


def task_accuracy(adapter: Adapter, task: dict, torch) -> dict:
    """Equal-budget training: same frames, batches, epochs, loss, optimiser and
    schedule for every code; then the force and energy MAE on the test frames."""
    acc = task["accuracy"]
    data = prepare({**task, "frames": acc["train"], "stats_frames": acc["train"]})
    test = prepare({**task, "frames": acc["test"], "stats_frames": acc["train"]})["frames"]
    torch.manual_seed(task.get("seed", 0))
    model = adapter.build(data["species"], data, task["model"])
    info = _model_info(adapter, model)
    model.train()
    train = data["frames"]
    bs, epochs = task["batch_size"], acc["epochs"]
    steps_per_epoch = len(train) // bs
    opt = torch.optim.Adam(model.parameters(), lr=acc["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=epochs * steps_per_epoch, eta_min=acc["lr"] * acc.get("min_lr_ratio", 0.01)
    )
    rng = np.random.default_rng(task.get("seed", 0))
    t0 = time.perf_counter()
    losses = []
    for epoch in range(epochs):
        order = rng.permutation(len(train))
        total = 0.0
        for k in range(steps_per_epoch):
            frames = [train[i] for i in order[k * bs : (k + 1) * bs]]
            b = adapter.batch(frames, model, data)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(adapter.predict(model, b, training=True))
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        losses.append(total / steps_per_epoch)
        print(f"[{adapter.name}] epoch {epoch + 1}/{epochs} train loss {losses[-1]:.5f}", file=sys.stderr, flush=True)
    train_seconds = time.perf_counter() - t0
    model.eval()
    f_err, e_err = [], []
    for frames in batches_of(test, 1):
        b = adapter.batch(frames, model, data)
        energy, forces, n_atoms, e_ref, f_ref = adapter.predict(model, b, training=False)
        f_err.append((forces.detach() - f_ref).abs().double().numpy().ravel())
        e_err.append(((energy.detach() - e_ref) / n_atoms).abs().double().numpy())
    f_err, e_err = np.concatenate(f_err), np.concatenate(e_err)
    return {
        "force_mae_meV_A": 1000 * float(f_err.mean()),
        "force_rmse_meV_A": 1000 * float(np.sqrt((f_err**2).mean())),
        "energy_mae_meV_atom": 1000 * float(e_err.mean()),
        "train_seconds": train_seconds,
        "epochs": epochs,
        "steps": epochs * steps_per_epoch,
        "train_loss": losses,
        "n_train": len(train),
        "n_test": len(test),
        **info,
    }


def _model_info(adapter, model) -> dict:
    return {
        "n_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "architecture": adapter.describe(model),
    }


TASKS = {
    "train": task_train,
    "infer_batch": task_infer_batch,
    "infer_calc": task_infer_calc,
    "accuracy": task_accuracy,
}


def main(adapter: Adapter, extra_tasks: dict | None = None) -> None:
    task = json.loads(sys.argv[1])
    threads = int(task.get("threads", 2))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(task.get("seed", 0))
    tasks = {**TASKS, **(extra_tasks or {})}
    adapter.compile, adapter.task = bool(task.get("compile", False)), task["task"]
    t0 = time.perf_counter()
    try:
        result = tasks[task["task"]](adapter, task, torch)
        result["ok"] = True
    except Exception as err:  # reported, not raised: the driver prints it in the table
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
    result.update(
        code=adapter.name, version=_safe(adapter.version), task=task["task"], system=task.get("system"),
        torch=torch.__version__, threads=torch.get_num_threads(), wall_seconds=time.perf_counter() - t0,
        malloc=loaded_malloc(), compile=adapter.compile, one_off=adapter.one_off,
    )
    print("BENCH_JSON " + json.dumps(result, default=_jsonable), flush=True)


def _safe(fn):
    try:
        return fn()
    except Exception as err:  # pragma: no cover
        return f"? ({err})"


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)
