"""NequIP side of the benchmark (runs in its own virtual environment).

Model: ``nequip.model.NequIPGNNModel`` (the NequIP framework's model builder)
with ``l_max=2, parity=False`` (hidden irreps 32x0e+32x1o+32x2e, as mfmlip),
``num_layers=3``, ``num_features=32``, radial MLP of 2 hidden layers of 64 (as
mfmlip and SevenNet), float32, eager mode. Graphs: ``nequip.data.from_ase``
then the framework's type-mapper and neighbour-list transforms, batched by
``AtomicDataDict.batched_from_list``. Calculator:
``nequip.integrations.ase.NequIPCalculator`` with the same two transforms (what
``from_compiled_model``/saved-model loading builds).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common


def _transforms(model):
    from nequip.data.transforms import (
        ChemicalSpeciesToAtomTypeMapper,
        NeighborListTransform,
    )

    names = model._bench_type_names
    return [
        ChemicalSpeciesToAtomTypeMapper(model_type_names=names, chemical_species_to_atom_type_map={n: n for n in names}),
        NeighborListTransform(r_max=model._bench_r_max),
    ]


class NequipAdapter(common.Adapter):
    name = "nequip"

    def version(self):
        from importlib.metadata import version

        return version("nequip")

    def build(self, species, stats, cfg):
        from ase.data import chemical_symbols
        from nequip.model import NequIPGNNModel
        from nequip.utils.global_state import set_global_state

        set_global_state()  # as nequip-train does (it also sets nequip's float64 default dtype for data)
        names = [chemical_symbols[z] for z in species]
        model = NequIPGNNModel(
            seed=0,
            model_dtype="float32",
            r_max=float(cfg["cutoff"]),
            type_names=names,
            num_layers=int(cfg["layers"]),
            l_max=int(cfg["lmax"]),
            parity=False,
            num_features=int(cfg["channels"]),
            radial_mlp_depth=2,
            radial_mlp_width=64,
            avg_num_neighbors=float(stats["avg_num_neighbors"]),
            per_type_energy_scales=float(stats["scale"]),
            per_type_energy_shifts=float(stats["shift"]),
        )
        model._bench_type_names = names
        model._bench_r_max = float(cfg["cutoff"])
        model._bench_transforms = _transforms(model)
        return model

    def describe(self, model):
        from e3nn import o3

        irreps = [
            str(m.irreps_out["node_features"])
            for m in model.modules()
            if type(m).__name__ == "ConvNetLayer" and hasattr(m, "irreps_out")
        ]
        return " / ".join(str(o3.Irreps(i)) for i in irreps)

    def batch(self, frames, model, stats):
        from ase.calculators.singlepoint import SinglePointCalculator
        from nequip.data import AtomicDataDict, from_ase

        graphs = []
        for a in frames:
            b = a.copy()
            b.info, b.calc = {}, SinglePointCalculator(
                b, energy=float(a.info["bench_energy"]), forces=a.arrays["bench_forces"]
            )
            d = from_ase(b)
            for t in model._bench_transforms:
                d = t(d)
            graphs.append(d)
        return AtomicDataDict.batched_from_list(graphs)

    def predict(self, model, batch, training):
        model.train(training)
        out = model(dict(batch))
        energy = out["total_energy"].reshape(-1)
        n = batch["num_atoms"].reshape(-1).to(energy.dtype)
        return energy, out["forces"], n, batch["total_energy"].reshape(-1).to(energy.dtype), batch["forces"].to(energy.dtype)

    def calculator(self, model, stats, workdir):
        from nequip.integrations.ase import NequIPCalculator

        model.eval()
        return NequIPCalculator(model=model, device="cpu", transforms=_transforms(model))


if __name__ == "__main__":
    common.main(NequipAdapter())
