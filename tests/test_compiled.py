"""training.compile: the unrolled, compiled energy-and-forces graph gives the eager
model's energies, forces, stress and weight gradients (the force loss's double
backward included), for batches of other sizes than the traced one, and a run
trained with it logs the losses and ends with the weights of an eager run; in
eval mode (inference) it gives the eager energies and forces, one structure
included."""

from __future__ import annotations

import pytest
import torch
import yaml
from pydantic import ValidationError

from mfmlip import keys as K
from mfmlip.data.graph import atoms_to_batch, collate
from mfmlip.model import DeltaPotential
from mfmlip.model.compiled import CompiledPotential, _cpu_options
from mfmlip.model.interface import Potential
from mfmlip.training.config import ConfigError, TrainingConfig
from mfmlip.training.module import MFLightningModule
from mfmlip.training.run import read_metrics, train
from tests.conftest import rattled_si


def _batch(n_cells: int, cutoff: float) -> dict:
    cells = []
    for k in range(n_cells):
        atoms = rattled_si()
        atoms.rattle(0.05, seed=10 + k)
        cells.append(atoms_to_batch(atoms, cutoff, fidelity_index=k % 2))
    batch = collate(cells) if n_cells > 1 else cells[0]
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def _assert_same(model, fast, eager, keys):
    for key in keys:
        torch.testing.assert_close(fast[key], eager[key], rtol=1e-10, atol=1e-12, msg=key)
    for a, b in zip(_loss_and_gradients(model, fast, keys), _loss_and_gradients(model, eager, keys)):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _loss_and_gradients(model, out, keys):
    loss = sum((out[k] ** 2).sum() for k in keys)
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)


def test_the_unrolled_graph_gives_the_eager_outputs_and_weight_gradients(make_model):
    model = make_model(lmax=2, channels=4).train()  # l = 1, 2 gates: sigmoid outputs saved for the backward
    compiled = CompiledPotential(model, backend=None)
    every = (K.ENERGY, K.FORCES, K.STRESS)
    for n_cells in (2, 3, 1):  # traced on the first batch, reused for a larger one; one cell runs eagerly
        batch = _batch(n_cells, model.cutoff)
        _assert_same(model, compiled(batch, compute_stress=True),
                     model(batch, compute_forces=True, compute_stress=True), every)
    # an energy-only batch gets its own graph, without derivatives (as the eager step)
    batch = _batch(3, model.cutoff)
    fast = compiled(batch, compute_forces=False)
    assert set(fast) == {K.ENERGY} and len(compiled._graphs) == 2
    _assert_same(model, fast, model(batch), (K.ENERGY,))


def test_the_graph_does_not_depend_on_the_data_statistics(make_model):
    # Inductor's cache keys on the graph: a constant from the data (neighbour count, E0, energy
    # scale) would make every data set compile anew, as each study run did
    batch = _batch(2, 4.0)
    codes = []
    for avg, scale in ((10.0, 1.0), (37.5, 0.3)):
        model = make_model(avg_num_neighbors=avg, energy_scale=scale, e0=torch.full((2, 1), -avg)).train()
        compiled = CompiledPotential(model, backend=None)
        compiled(batch)
        codes.append(next(iter(compiled._graphs.values())).code)
    assert codes[0] == codes[1]


@pytest.mark.parametrize("backend", [None, "inductor"])
def test_inference_graphs_give_the_eager_energies_and_forces(make_model, backend):
    model = make_model(lmax=1, channels=4, num_layers=1).eval()  # an l = 1 gate: sigmoid outputs
    compiled = CompiledPotential(model, backend=backend)
    for n_cells in (1, 3, 2, 1):  # one structure (a calculator's call) has a graph of its own, reused
        batch = _batch(n_cells, model.cutoff)
        fast, eager = compiled(batch), model(batch, compute_forces=True)
        for key in (K.ENERGY, K.FORCES):
            torch.testing.assert_close(fast[key], eager[key].detach(), rtol=1e-10, atol=1e-12, msg=key)
        assert not fast[K.FORCES].requires_grad  # no graph to the weights
    assert sorted(key[2] for key in compiled._graphs) == [False, True]


def test_a_delta_model_compiles_with_its_base_frozen(make_model):
    delta = DeltaPotential(make_model(), "PBE", make_model(seed=1)).train()
    compiled = CompiledPotential(delta, backend=None)
    batch = _batch(2, delta.cutoff)
    _assert_same(delta, compiled(batch), delta(batch, compute_forces=True), (K.ENERGY, K.FORCES))


def _config(tmp_path, data_dir, name: str, compile_: bool):
    cfg = {
        "seed": 2, "output_dir": str(tmp_path / name),
        "data": {"root": str(data_dir), "files": [
            {"path": "ethanol/PBE_train.extxyz", "index": "0:40", "split": {"train": None, "val": 8}}]},
        "model": {"cutoff": 4.0, "channels": 4, "lmax": 1, "num_layers": 1, "num_radial": 4, "radial_hidden": 8,
                  "dtype": "float64"},
        "training": {"batch_size": 8, "max_epochs": 2, "lr": 0.01, "compile": compile_},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_a_compiled_run_trains_the_eager_run(tmp_path, data_dir):
    runs = {flag: train(_config(tmp_path, data_dir, f"compile_{flag}", flag)) for flag in (False, True)}
    losses = {flag: [float(r["train_loss"]) for r in read_metrics(tmp_path / f"compile_{flag}") if r.get("train_loss")]
              for flag in runs}
    assert len(losses[True]) > 0
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-8, atol=0.0)
    weights = {flag: torch.load(path, weights_only=False)["state_dict"] for flag, path in runs.items()}
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-8, atol=1e-12, msg=name)


def test_what_compile_cannot_do_is_refused(make_model):
    with pytest.raises(ValidationError, match="compile needs batch_size >= 2"):
        TrainingConfig(batch_size=1, compile=True)

    class Other(Potential):  # e.g. a SevenNet model: not traced by mfmlip
        pass

    with pytest.raises(ConfigError, match="mfmlip's own models only, not Other"):
        MFLightningModule(Other([1], ["PBE"], 4.0), TrainingConfig(compile=True), [[1.0, 1.0, 0.0]])


def test_cpu_graphs_launch_their_kernels_from_cpp_unless_the_environment_decides(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CPP_WRAPPER", raising=False)
    assert _cpu_options() == {"cpp_wrapper": True}
    monkeypatch.setenv("TORCHINDUCTOR_CPP_WRAPPER", "0")  # the A/B switch of docs/benchmarks/compile.md
    assert _cpu_options() == {}
