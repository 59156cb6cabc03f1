"""NequIP side of the benchmark (runs in its own virtual environment).

Model: ``nequip.model.NequIPGNNModel`` (the NequIP framework's model builder)
with ``l_max=2, parity=False`` (hidden irreps 32x0e+32x1o+32x2e, as mfmlip),
``num_layers=3``, ``num_features=32``, radial MLP of 2 hidden layers of 64 (as
mfmlip and SevenNet), float32, eager mode. Graphs: ``nequip.data.from_ase``
then the framework's type-mapper and neighbour-list transforms, batched by
``AtomicDataDict.batched_from_list``. Calculator:
``nequip.integrations.ase.NequIPCalculator`` with the same two transforms (what
``from_compiled_model``/saved-model loading builds).

``nequip+compile`` (``Adapter.compile``): NequIP's own compiled paths. Training:
the model built with ``compile_mode="compile"`` (NequIP's train-time
``torch.compile`` of a ``make_fx`` graph of energy and forces, compiled at the
first step). Inference: what ``nequip-compile --mode aotinductor`` writes, for
``--target batch`` (the batched rows, built at the first call) and ``--target
ase`` (the calculator, ``NequIPCalculator.from_compiled_model``, built when the
calculator is made; its seconds are in ``one_off``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

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
            compile_mode="compile" if self.compile and self.task in ("train", "accuracy") else "eager",
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
        model._bench_aoti = None  # nequip+compile: the AOTInductor model of the batched inference
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
        if self.compile and not training:  # built at the first call
            if model._bench_aoti is None:
                from nequip.model.inference_models import load_compiled_model

                path = _aoti_export(model, dict(batch), "batch", tempfile.mkdtemp(prefix="bench-nequip-"))
                model._bench_aoti = load_compiled_model(path, "cpu")[0]
            out = model._bench_aoti(dict(batch))
        else:
            out = model(dict(batch))
        energy = out["total_energy"].reshape(-1)
        n = batch["num_atoms"].reshape(-1).to(energy.dtype)
        return energy, out["forces"], n, batch["total_energy"].reshape(-1).to(energy.dtype), batch["forces"].to(energy.dtype)

    def calculator(self, model, stats, workdir):
        from nequip.integrations.ase import NequIPCalculator

        model.eval()
        if not self.compile:
            return NequIPCalculator(model=model, device="cpu", transforms=_transforms(model))
        data = self.batch(stats["frames"][:1], model, stats)
        start = time.perf_counter()
        path = _aoti_export(model, data, "ase", workdir)
        self.one_off["aoti_compile_s"] = time.perf_counter() - start
        return NequIPCalculator.from_compiled_model(path, device="cpu")


def _aoti_export(model, data, target: str, workdir: str) -> str:
    """``nequip-compile --mode aotinductor --target <target>`` of the eager ``model`` traced on ``data`` (a
    batch): the path of the ``<workdir>/<target>.nequip.pt2`` it writes."""
    import torch
    from nequip.scripts._compile_utils import COMPILE_TARGET_DICT
    from nequip.utils.aot import aot_export_model
    from nequip.utils.aoti_metadata import NEQUIP_AOTI_INPUTS_KEY, NEQUIP_AOTI_OUTPUTS_KEY, serialize_aoti_keys
    from nequip.utils.global_state import get_latest_global_state

    spec, path = COMPILE_TARGET_DICT[target], os.path.join(workdir, f"{target}.nequip.pt2")
    metadata = {**model.metadata, **get_latest_global_state(only_metadata_related=True)}
    metadata = {k: str(int(v)) if isinstance(v, bool) else str(v) for k, v in metadata.items()}
    metadata[NEQUIP_AOTI_INPUTS_KEY] = serialize_aoti_keys(spec["input"])
    metadata[NEQUIP_AOTI_OUTPUTS_KEY] = serialize_aoti_keys(spec["output"])
    dims = {k: torch.export.Dim(f"num_{k}s", min=2, max=torch.inf) for k in ("graph", "node", "edge")}  # its defaults
    aot_export_model(model=model, device="cpu", input_fields=spec["input"], output_fields=spec["output"],
                     data=spec["data_settings"](dict(data)), batch_map=spec["batch_map_settings"](dims),
                     output_path=path, inductor_configs={"aot_inductor.metadata": metadata})
    return path


if __name__ == "__main__":
    common.main(NequipAdapter())
