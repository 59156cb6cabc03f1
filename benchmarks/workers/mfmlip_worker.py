"""mfmlip side of the benchmark: the same harness as the peers (common.py),
plus the FLOP count and profile that the report needs for mfmlip only.

Run by benchmarks/speed.py in the project's own interpreter.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import common

FIDELITY = "bench"


def merge_paths(model):
    """Optimisation lever (not in mfmlip): one tensor-product output slot per output irrep.

    mfmlip gives every tensor-product path its own output slot (11 slots, 1120
    numbers per edge at 32 channels and lmax 2), then mixes them in
    ``linear_post``. Here paths with the same output irrep sum into one slot
    (e3nn normalises the fan-in), so the per-edge message is 288 wide: the
    scatter, the concatenation and its double backward shrink about 4x. Each
    path keeps its own per-edge, per-channel radial weight; only
    ``linear_post``'s mixing across the paths of one irrep is lost. The radial
    MLPs are unchanged; ``linear_post`` is rebuilt (random weights).
    """
    from e3nn import o3

    for block in model.blocks:
        tp = block.tp
        targets = []
        for ins in tp.instructions:
            ir = tp.irreps_out[ins.i_out].ir
            if ir not in targets:
                targets.append(ir)
        mul = tp.irreps_out[0].mul
        merged = o3.Irreps([(mul, ir) for ir in targets])
        instructions = [
            (ins.i_in1, ins.i_in2, targets.index(tp.irreps_out[ins.i_out].ir), ins.connection_mode, ins.has_weight)
            for ins in tp.instructions
        ]
        new_tp = o3.TensorProduct(
            tp.irreps_in1, tp.irreps_in2, merged, instructions, shared_weights=False, internal_weights=False
        )
        assert new_tp.weight_numel == tp.weight_numel
        extra = block.conditioning.extra_dim("post")
        block.tp = new_tp
        block.linear_post = o3.Linear(merged + o3.Irreps(f"{extra}x0e"), block.gate.irreps_in)
    return model


def _fused_module(tp):
    """An e3nn "uvu" TensorProduct (per-edge weights, every input with the same multiplicity) as
    three dense products instead of one small einsum per path:

    ``M[e] = sh[e] . C`` (coupling matrix per edge, mm), ``T[e] = x[e] @ M[e]`` (bmm over edges),
    ``out[e] = (T[e] * w[e, path(q)]) @ S`` (weights, then the sum of the paths into the output slots).

    ``C`` (including e3nn's path weights and normalisation) is read off the e3nn module by probing it
    with basis vectors, so the result equals ``tp(x1, x2, w)`` to rounding.
    """
    import torch

    mul = tp.irreps_in1[0].mul
    assert all(m == mul for m, _ in tp.irreps_in1) and all(m == mul for m, _ in tp.irreps_out)
    assert all(ins.connection_mode == "uvu" and ins.has_weight for ins in tp.instructions)
    d1 = sum(ir.dim for _, ir in tp.irreps_in1)  # components per channel of input 1
    d2 = tp.irreps_in2.dim
    dout = sum(ir.dim for _, ir in tp.irreps_out)
    off1 = [sum(ir.dim for _, ir in tp.irreps_in1[:k]) for k in range(len(tp.irreps_in1))]
    offo = [sum(ir.dim for _, ir in tp.irreps_out[:k]) for k in range(len(tp.irreps_out))]
    n_paths = len(tp.instructions)
    # q enumerates (path, output component); S maps q to the merged output component
    q_path, q_out = [], []
    for p, ins in enumerate(tp.instructions):
        for k in range(tp.irreps_out[ins.i_out].ir.dim):
            q_path.append(p)
            q_out.append(offo[ins.i_out] + k)
    nq = len(q_path)

    def e3nn_index1(i):  # component i of channel 0 in e3nn's layout of input 1
        k = max(j for j in range(len(off1)) if off1[j] <= i)
        return tp.irreps_in1.slices()[k].start + (i - off1[k])

    with torch.no_grad():
        dtype = torch.float64
        x1 = torch.zeros(n_paths, d1, d2, tp.irreps_in1.dim, dtype=dtype)
        x2 = torch.zeros(n_paths, d1, d2, d2, dtype=dtype)
        w = torch.zeros(n_paths, d1, d2, tp.weight_numel, dtype=dtype)
        for p in range(n_paths):
            for i in range(d1):
                for j in range(d2):
                    x1[p, i, j, e3nn_index1(i)] = 1.0
                    x2[p, i, j, j] = 1.0
                    w[p, i, j, p * mul] = 1.0  # uvu weights: path-major, then channel
        tp64 = tp.to(dtype)
        out = tp64(x1.reshape(-1, x1.shape[-1]), x2.reshape(-1, d2), w.reshape(-1, tp.weight_numel))
        tp.to(torch.get_default_dtype())
        out = out.reshape(n_paths, d1, d2, -1)
        coupling = torch.zeros(d2, d1, nq, dtype=dtype)  # C[j, i, q]
        for q, (p, o) in enumerate(zip(q_path, q_out)):
            k = max(j for j in range(len(offo)) if offo[j] <= o)
            col = tp.irreps_out.slices()[k].start + (o - offo[k])  # channel 0 of that output component
            coupling[:, :, q] = out[p, :, :, col].T
        S = torch.zeros(nq, dout, dtype=dtype)
        S[torch.arange(nq), torch.tensor(q_out)] = 1.0

    class _FusedUVU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.irreps_in1, self.irreps_in2, self.irreps_out = tp.irreps_in1, tp.irreps_in2, tp.irreps_out
            self.weight_numel = tp.weight_numel
            self.register_buffer("coupling", coupling.reshape(d2, d1 * nq).float())
            self.register_buffer("S", S.float())
            self.register_buffer("q_path", torch.tensor(q_path))

        def forward(self, x1, x2, weight):
            e = x1.shape[0]
            # e3nn layout [e, sum_l mul*(2l+1)] -> [e, mul, d1]
            x = torch.cat([x1[:, sl].reshape(e, mul, ir.dim) for sl, (_, ir) in zip(tp.irreps_in1.slices(),
                                                                                   tp.irreps_in1)], dim=2)
            m = (x2 @ self.coupling).reshape(e, d1, nq)
            t = torch.bmm(x, m)  # [e, mul, nq]
            wq = weight.reshape(e, n_paths, mul).transpose(1, 2)[:, :, self.q_path]
            y = (t * wq).reshape(e * mul, nq) @ self.S  # [e*mul, dout]
            y = y.reshape(e, mul, dout)
            return torch.cat([y[:, :, offo[k]:offo[k] + ir.dim].reshape(e, mul * ir.dim)
                              for k, (_, ir) in enumerate(tp.irreps_out)], dim=1)

    return _FusedUVU()


def fuse_tp(model):
    """Optimisation lever (not in mfmlip): merged paths (see :func:`merge_paths`) and the tensor
    product as three dense products (:func:`_fused_module`), numerically the same as e3nn's."""
    merge_paths(model)
    for block in model.blocks:
        block.tp = _fused_module(block.tp)
    return model


def readout_init(model):
    """Training lever (not in mfmlip): variance-preserving initialisation of the readout MLP
    (weights N(0, 1/fan_in), zero biases) instead of torch's default Linear init.

    With the default init an untrained mfmlip model predicts forces of about 1% of the label RMS
    and a constant energy offset of about 0.13 eV/atom (readout biases times the energy scale), so
    the first optimiser steps go into the offset; NequIP starts at about 13% and no offset.
    """
    import torch

    for layer in model.readout.mlp:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
            torch.nn.init.zeros_(layer.bias)
    return model


def sqrt_neighbors(model):
    """Training lever (not in mfmlip): divide the summed messages by sqrt(avg_num_neighbors), as
    NequIP does, instead of by avg_num_neighbors. With ~50 neighbours and messages of random sign
    the 1/N sum is ~1/sqrt(N) ~ 0.14 of the self-connection per layer, so an untrained model's
    energy hardly depends on the geometry (forces ~1% of the label RMS)."""
    for block in model.blocks:
        block.avg_num_neighbors = block.avg_num_neighbors**0.5
    return model


VARIANTS = {
    "baseline": lambda m: m,
    "sqrt_neighbors": sqrt_neighbors,
    "merged_paths_sqrt_neighbors": lambda m: sqrt_neighbors(merge_paths(m)),
    "merged_paths": merge_paths,
    "fused_tp": fuse_tp,
    "readout_init": readout_init,
    "merged_paths_readout_init": lambda m: readout_init(merge_paths(m)),
}


class MfmlipAdapter(common.Adapter):
    name = "mfmlip"
    variant = "baseline"

    def version(self):
        import subprocess

        import mfmlip

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
        return f"{getattr(mfmlip, '__version__', 'dev')}+g{rev}" if rev else getattr(mfmlip, "__version__", "dev")

    def build(self, species, stats, cfg):
        import torch

        from mfmlip.model.potential import MFPotential

        model = MFPotential(
            species, [FIDELITY], cutoff=cfg["cutoff"], channels=cfg["channels"], lmax=cfg["lmax"],
            num_layers=cfg["layers"], avg_num_neighbors=stats["avg_num_neighbors"],
            energy_scale=stats["scale"],
            e0=torch.full((1, len(species)), 0.0),
        )
        # the per-atom shift (about 0 after the E0 fit) goes into E0, as in mfmlip's training
        model.e0 += stats["shift"]
        return VARIANTS[self.variant](model).to(torch.float32)

    def describe(self, model):
        text = " / ".join(str(b.irreps_out) for b in model.blocks)
        return text if self.variant == "baseline" else f"{text} [variant {self.variant}]"

    def batch(self, frames, model, stats):
        import torch

        from mfmlip import keys as K
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
        from mfmlip import keys as K

        model.train(training)
        out = model(batch, compute_forces=True)
        e_ref, f_ref = batch["_labels"]
        return out[K.ENERGY], out[K.FORCES], batch[K.N_ATOMS].to(out[K.ENERGY].dtype), e_ref, f_ref

    def calculator(self, model, stats, workdir):
        from mfmlip.simulation.calculator import MFCalculator

        return MFCalculator(model, fidelity=FIDELITY, device="cpu", dtype="float32")


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
    return step, infer, n_atoms, n_edges


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

    step, infer, n_atoms, n_edges = _train_closure(task, torch)
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
    # Reference: plain float32 matmul. "radial MLP": (n_edges x 64) @ (64 x 352), the shape of the
    # largest counted product (the last layer of a radial MLP); "node linear": (n_atoms x 288) @ (288 x 288);
    # "square": a 1024^3 GEMM (about the machine's peak for this thread count).
    hidden, width = 64, 352
    out["matmul_gflops"] = {
        f"radial MLP ({n_edges}x{hidden})@({hidden}x{width})": _matmul_gflops(torch, n_edges, hidden, width),
        f"node linear ({n_atoms}x288)@(288x288)": _matmul_gflops(torch, n_atoms, 288, 288),
        "square 1024^3": _matmul_gflops(torch, 1024, 1024, 1024),
    }
    return out


def task_profile(adapter, task, torch):
    """torch.profiler over a few training steps (and batched inference): top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    step, infer, n_atoms, n_edges = _train_closure(task, torch)
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
    import json

    ADAPTER.variant = json.loads(sys.argv[1]).get("variant", "baseline")
    common.main(ADAPTER, {"flops": task_flops, "profile": task_profile})
