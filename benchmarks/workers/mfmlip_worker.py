"""mfmlip side of the benchmark: the same harness as the peers (common.py),
plus the FLOP count and profile that the report needs for mfmlip only.

The model is ``MFPotential`` as mfmlip builds it by default (merged
tensor-product paths, messages divided by sqrt(avg_num_neighbors)); nothing
is changed here. Run by benchmarks/speed.py in the project's own interpreter,
with tcmalloc preloaded or not as the driver decides.

``mfmlip+compile`` (``Adapter.compile``): energy and forces through
:class:`mfmlip.model.compiled.CompiledPotential` (make_fx + Inductor), as
``training.compile: true`` trains; in eval mode its inference graphs (no
``create_graph``, no graph to the weights). The calculator is
:class:`CompiledCalculator`: ``MFCalculator``'s batch (neighbour list, graph)
with the compiled energy and forces, since the shipped calculator is eager.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import common
from ase.calculators.calculator import Calculator, all_changes

from mfmlip import keys as K
from mfmlip.model.compiled import CompiledPotential
from mfmlip.model.inference import intra_op_threads, threads_for
from mfmlip.simulation.calculator import MFCalculator

FIDELITY = "bench"


class MfmlipAdapter(common.Adapter):
    name = "mfmlip"

    def version(self):
        import subprocess

        import mfmlip
        from mfmlip.model.serialization import FORMAT_VERSION

        root = os.path.dirname(os.path.dirname(os.path.abspath(mfmlip.__file__)))
        try:
            rev = subprocess.run(
                ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            # uncommitted changes in the files the benchmark runs
            dirty = subprocess.run(
                ["git", "-C", root, "status", "--porcelain", "--", "mfmlip/model", "mfmlip/data/graph.py",
                 "mfmlip/simulation/calculator.py"], capture_output=True, text=True, timeout=10,
            ).stdout.strip()
            rev += ".dirty" if dirty else ""
        except (OSError, subprocess.SubprocessError):
            rev = ""
        version = getattr(mfmlip, "__version__", "dev") + (f"+g{rev}" if rev else "")
        return f"{version} (model format {FORMAT_VERSION})"  # the format changes with the architecture

    def build(self, species, stats, cfg):
        import torch

        from mfmlip.model import MFPotential, ModelSpec

        spec = ModelSpec(
            species=species, fidelities=[FIDELITY], cutoff=cfg["cutoff"], channels=cfg["channels"],
            lmax=cfg["lmax"], num_layers=cfg["layers"], avg_num_neighbors=stats["avg_num_neighbors"],
        )
        model = MFPotential(spec, e0=torch.full((1, len(species)), 0.0), energy_scale=stats["scale"])
        # the per-atom shift (about 0 after the E0 fit) goes into E0, as in mfmlip's training
        model.e0 += stats["shift"]
        model = model.to(torch.float32)
        self.compiled = CompiledPotential(model) if self.compile else None
        return model

    def describe(self, model):
        return " / ".join(str(b.irreps_out) for b in model.blocks)

    def batch(self, frames, model, stats):
        import torch

        from mfmlip.data.graph import collate, structure_to_graph, to_device
        from mfmlip.data.structures import Structure

        graphs = []
        for a in frames:
            s = Structure(
                positions=np.asarray(a.positions, dtype=np.float64), atomic_numbers=a.numbers.astype(np.int64),
                cell=np.asarray(a.cell.array, dtype=np.float64), pbc=np.asarray(a.pbc, dtype=bool),
                fidelity=FIDELITY, energy=float(a.info["bench_energy"]), forces=a.arrays["bench_forces"],
            )
            graphs.append(structure_to_graph(s, model.cutoff, 0))
        b = to_device(collate(graphs), "cpu", torch.float32)
        b["_labels"] = (b[K.ENERGY], b[K.FORCES])
        return b

    def predict(self, model, batch, training):
        model.train(training)
        out = (self.compiled or model)(batch, compute_forces=True)
        e_ref, f_ref = batch["_labels"]
        return out[K.ENERGY], out[K.FORCES], batch[K.N_ATOMS].to(out[K.ENERGY].dtype), e_ref, f_ref

    def calculator(self, model, stats, workdir):
        make = CompiledCalculator if self.compile else MFCalculator
        return make(model, fidelity=FIDELITY, device="cpu", dtype="float32")


class CompiledCalculator(MFCalculator):
    """``MFCalculator`` with energy and forces from :class:`CompiledPotential`'s one-structure
    inference graph (traced and compiled at the first call); the same batch and threads."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.compiled = CompiledPotential(self.model)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        Calculator.calculate(self, atoms, properties, system_changes)
        batch = self.predictor.batch([self.atoms])
        with intra_op_threads(threads_for(len(self.atoms), self.predictor.threads)):
            out = self.compiled(batch, compute_forces=True)
        energy = float(out[K.ENERGY].item())
        self.results = {"energy": energy, "free_energy": energy, "forces": out[K.FORCES].numpy().astype(np.float64)}


ADAPTER = MfmlipAdapter()


# ---------------------------------------------------------------------------
# mfmlip-only tasks: FLOPs, matmul reference, profile


def _train_closure(task, torch):
    data = common.prepare(task)
    model = ADAPTER.build(data["species"], data, task["model"])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = ADAPTER.batch(data["frames"][: task["batch_size"]], model, data)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = common.loss_fn(ADAPTER.predict(model, batch, training=True))
        loss.backward()
        opt.step()

    def infer():
        model.eval()
        e, f, *_ = ADAPTER.predict(model, batch, training=False)
        f.sum().item()

    n_edges = int(batch["edge_index"].shape[1])
    n_atoms = int(batch["n_atoms"].sum())
    return step, infer, n_atoms, n_edges, model


def _matmul_gflops(torch, m: int, k: int, n: int, seconds: float = 1.0) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2.0 * m * k * n * count / (time.perf_counter() - t0) / 1e9


def task_flops(adapter, task, torch):
    """FLOPs per training step and per inference (batched), by torch.utils.flop_counter
    (counts matmul-like ops only: mm, bmm, addmm, einsum-lowered matmuls, convolutions),
    the achieved GFLOP/s at the median step time, and plain float32 matmul GFLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode

    step, infer, n_atoms, n_edges, model = _train_closure(task, torch)
    out = {"n_atoms": n_atoms, "n_edges": n_edges, "batch_size": task["batch_size"]}
    for name, fn in (("train", step), ("infer", infer)):
        fn()  # warm-up (e3nn code generation) before counting
        counter = FlopCounterMode(display=False, depth=None)
        with counter:
            fn()
        flops = counter.get_total_flops()
        top = sorted(
            ((str(k), int(v)) for k, v in counter.get_flop_counts().get("Global", {}).items()),
            key=lambda kv: -kv[1],
        )[:6]
        times = []
        for _ in range(task["reps"]):
            t0 = time.perf_counter()
            for _ in range(task["per_rep"]):
                fn()
            times.append((time.perf_counter() - t0) / task["per_rep"])
        sec = float(np.median(times))
        out[name] = {"flops": flops, "seconds": sec, "gflops_per_s": flops / sec / 1e9, "flops_by_op": top}
    # Reference: plain float32 matmul. "radial MLP": (n_edges x hidden) @ (hidden x weights), the shape of
    # the largest counted product (the last layer of a radial MLP: one weight per path and channel);
    # "node linear": (n_atoms x d) @ (d x d) with d the hidden irreps' dimension (288 at 32 channels, lmax 2);
    # "square": a 1024^3 GEMM (about the machine's peak for this thread count).
    hidden, width = max((b.radial_mlp.hs[-2], b.radial_mlp.hs[-1]) for b in model.blocks)
    d = model.blocks[0].irreps_out.dim
    out["matmul_gflops"] = {
        f"radial MLP ({n_edges}x{hidden})@({hidden}x{width})": _matmul_gflops(torch, n_edges, hidden, width),
        f"node linear ({n_atoms}x{d})@({d}x{d})": _matmul_gflops(torch, n_atoms, d, d),
        "square 1024^3": _matmul_gflops(torch, 1024, 1024, 1024),
    }
    return out


def task_profile(adapter, task, torch):
    """torch.profiler over a few training steps (and batched inference): top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    step, infer, *_ = _train_closure(task, torch)
    out = {}
    for name, fn in (("train", step), ("infer", infer)):
        for _ in range(2):
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(task["per_rep"]):
                fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
        out[name] = [
            {"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1000 / task["per_rep"],
             "share": e.self_cpu_time_total / total, "calls": e.count // task["per_rep"]}
            for e in rows
        ]
        out[name + "_table"] = events.table(sort_by="self_cpu_time_total", row_limit=15)
    return out


if __name__ == "__main__":
    common.main(ADAPTER, {"flops": task_flops, "profile": task_profile})
