"""SevenNet side of the benchmark (runs in its own virtual environment).

Model: ``sevenn.model_build.build_E3_equivariant_model`` from a config made by
``sevenn.parse_input.init_model_config`` (SevenNet's NequIP-type interaction),
with ``is_parity: False`` so that the hidden irreps are 32x0e+32x1e+32x2e, the
same sizes as mfmlip's 32x0e+32x1o+32x2e. Graphs: ``sevenn.train.dataload.atoms_to_graph``
batched by torch_geometric. Calculator: ``sevenn.calculator.SevenNetCalculator``
with the model instance.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common


class SevennAdapter(common.Adapter):
    name = "sevenn"

    def version(self):
        from importlib.metadata import version

        return version("sevenn")

    def build(self, species, stats, cfg):
        import sevenn._keys as KEY
        import torch
        from ase.data import chemical_symbols
        from sevenn.model_build import build_E3_equivariant_model
        from sevenn.parse_input import init_model_config

        config = init_model_config({
            KEY.CHEMICAL_SPECIES: [chemical_symbols[z] for z in species],
            KEY.CUTOFF: float(cfg["cutoff"]),
            KEY.NODE_FEATURE_MULTIPLICITY: int(cfg["channels"]),
            KEY.LMAX: int(cfg["lmax"]),
            KEY.NUM_CONVOLUTION: int(cfg["layers"]),
            KEY.IS_PARITY: False,
            KEY.CONV_DENOMINATOR: float(stats["avg_num_neighbors"]),
        })
        config[KEY.SHIFT] = float(stats["shift"])
        config[KEY.SCALE] = float(stats["scale"])
        model = build_E3_equivariant_model(config).to(torch.float32)
        model.set_is_batch_data(True)
        return model

    def describe(self, model):
        return " / ".join(
            str(m.gate.irreps_out) for n, m in model._modules.items() if n.endswith("equivariant_gate")
        )

    def batch(self, frames, model, stats):
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import atoms_to_graph
        from torch_geometric.data import Batch

        graphs = []
        for a in frames:
            b = a.copy()
            b.info = {"y_energy": float(a.info["bench_energy"])}
            b.arrays["y_force"] = a.arrays["bench_forces"]
            graphs.append(AtomGraphData.from_numpy_dict(atoms_to_graph(b, model.cutoff, transfer_info=False)))
        return Batch.from_data_list(graphs)

    def predict(self, model, batch, training):
        import sevenn._keys as KEY

        model.train(training)
        model.set_is_batch_data(True)
        out = model(batch.clone())
        energy = out[KEY.PRED_TOTAL_ENERGY].reshape(-1)
        n = batch[KEY.NUM_ATOMS].reshape(-1).to(energy.dtype)
        return energy, out[KEY.PRED_FORCE], n, batch[KEY.ENERGY].reshape(-1).to(energy.dtype), batch[KEY.FORCE].to(energy.dtype)

    def calculator(self, model, stats, workdir):
        from sevenn.calculator import SevenNetCalculator

        return SevenNetCalculator(model, file_type="model_instance", device="cpu")


if __name__ == "__main__":
    common.main(SevennAdapter())
