"""MACE side of the benchmark (runs in its own virtual environment: mace-torch
pins e3nn 0.4.4 and installs a top-level ``tests`` package).

Model: ``mace.modules.ScaleShiftMACE`` built as ``mace_run_train --model MACE``
does (RealAgnosticInteractionBlock first, RealAgnosticResidualInteractionBlock
after, MLP_irreps 16x0e, radial MLP [64, 64, 64], 8 Bessel functions, gate
SiLU, MACE's default correlation order 3), at hidden irreps
32x0e+32x1o+32x2e, max_ell 2, 3 interactions. Graphs:
``mace.data.config_from_atoms`` + ``AtomicData.from_config`` batched by
MACE's copy of torch_geometric. Calculator: ``mace.calculators.MACECalculator(models=...)``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common


class MaceAdapter(common.Adapter):
    name = "mace"

    def version(self):
        from importlib.metadata import version

        return version("mace-torch")

    def build(self, species, stats, cfg):
        import numpy as np
        import torch

        # isort: off
        # mace first: importing it sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, which e3nn 0.4 needs with torch >= 2.6
        from mace import modules
        from e3nn import o3
        # isort: on

        c, lmax = int(cfg["channels"]), int(cfg["lmax"])
        hidden = o3.Irreps(" + ".join(f"{c}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(lmax + 1)))
        model = modules.ScaleShiftMACE(
            r_max=float(cfg["cutoff"]),
            num_bessel=8,
            num_polynomial_cutoff=5,
            max_ell=lmax,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=int(cfg["layers"]),
            num_elements=len(species),
            hidden_irreps=hidden,
            MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=np.zeros(len(species)),
            avg_num_neighbors=float(stats["avg_num_neighbors"]),
            atomic_numbers=list(species),
            correlation=int(cfg.get("mace_correlation", 3)),
            gate=modules.gate_dict["silu"],
            atomic_inter_scale=float(stats["scale"]),
            atomic_inter_shift=float(stats["shift"]),
            radial_MLP=[64, 64, 64],
        )
        model._bench_species = list(species)
        return model.to(torch.float32)

    def describe(self, model):
        return " / ".join(str(p.linear.irreps_out) for p in model.products) + " (correlation 3)"

    def batch(self, frames, model, stats):
        from mace import data as mace_data
        from mace.tools import AtomicNumberTable
        from mace.tools.torch_geometric.batch import (
            Batch,  # MACE's own copy of torch_geometric
        )

        keyspec = mace_data.KeySpecification(info_keys={"energy": "bench_energy"}, arrays_keys={"forces": "bench_forces"})
        table = AtomicNumberTable(model._bench_species)
        graphs = [
            mace_data.AtomicData.from_config(
                mace_data.config_from_atoms(a, key_specification=keyspec), z_table=table, cutoff=float(model.r_max)
            )
            for a in frames
        ]
        return Batch.from_data_list(graphs)

    def predict(self, model, batch, training):
        model.train(training)
        out = model(batch.to_dict(), training=training, compute_force=True)
        energy = out["energy"].reshape(-1)
        n = (batch.ptr[1:] - batch.ptr[:-1]).to(energy.dtype)
        return energy, out["forces"], n, batch.energy.reshape(-1).to(energy.dtype), batch.forces.to(energy.dtype)

    def calculator(self, model, stats, workdir):
        from mace.calculators import MACECalculator

        return MACECalculator(models=model, device="cpu", default_dtype="float32")


if __name__ == "__main__":
    common.main(MaceAdapter())
