"""Numerical trouble: NaN/inf losses and gradients stop the run naming the
batch's structures, or are skipped and counted; a diverged model is never
written as best; seeds make runs reproducible; the calculator refuses
overlapping atoms at a configurable distance; evaluation reports stress and
the calculator keeps a model object's dtype.

Whole trainings here are the tiny water run of ``tiny_runs`` (about a second each).
"""

import math
import warnings
from types import SimpleNamespace

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from tiny_runs import labelled_water, tiny_config

from mfmlip import MFCalculator
from mfmlip.model import load_model
from mfmlip.training.checkpoint import AtomicCheckpointIO
from mfmlip.training.module import MFLightningModule
from mfmlip.training.run import read_metrics, train
import yaml
from conftest import predict
from mfmlip import keys as K
from mfmlip.analysis.evaluate import evaluate
from mfmlip.data.graph import collate
from mfmlip.data.structures import structure_from_atoms
from mfmlip.training.data import GraphDataset
from mfmlip.model import MFPotential, ModelSpec
from mfmlip.training.config import TrainingConfig

pytestmark = pytest.mark.usefixtures("data_root_from_the_config")

E0 = {"PBE": {"H": 0.0, "O": 0.0}}  # given, so that the huge label below does not enter an E0 fit


def _bad_label_config(tmp_path, name, **training):
    """Water data plus bad.extxyz: one frame whose energy (1e30 eV) makes the float32 loss inf."""
    atoms = labelled_water(seed=99)
    atoms.calc.results["energy"] = 1e30
    ase.io.write(tmp_path / "bad.extxyz", atoms, format="extxyz")
    files = [{"path": "water.extxyz", "split": {"train": None, "val": 4, "test": 0}},
             {"path": "bad.extxyz", "split": {"train": None, "val": 0, "test": 0}}]
    return tiny_config(tmp_path, name, files=files, data={"e0": E0}, **training)


def _skipped(run) -> list[float]:
    return [float(r["skipped_batches"]) for r in read_metrics(run) if r.get("skipped_batches")]


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def test_nonfinite_loss_stops_the_run_naming_the_structures(tmp_path):
    config = _bad_label_config(tmp_path, "stop")
    with pytest.raises(FloatingPointError) as err:
        train(config)
    message = str(err.value)
    assert "loss is inf" in message and f"{tmp_path / 'bad.extxyz'}: frame 0" in message
    assert "water.extxyz: frame" in message  # the whole batch is named
    assert "nonfinite_loss: skip" in message
    assert not (tmp_path / "stop" / "model.pt").exists()
    for ckpt in (tmp_path / "stop" / "checkpoints").glob("*.ckpt"):
        assert _all_finite(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])


def test_nonfinite_loss_skip_counts_the_batches_across_a_resume(tmp_path):
    train(_bad_label_config(tmp_path, "skip", nonfinite_loss="skip", max_epochs=2))
    # one batch per epoch holds the bad frame; the count goes to metrics.csv every epoch
    assert _skipped(tmp_path / "skip") == [1.0, 2.0]
    train(_bad_label_config(tmp_path, "skip", nonfinite_loss="skip", max_epochs=3), resume=True)
    assert _skipped(tmp_path / "skip") == [1.0, 2.0, 3.0]
    model = load_model(tmp_path / "skip" / "model.pt")
    assert _all_finite(model.state_dict())
    val = [float(r["val_loss"]) for r in read_metrics(tmp_path / "skip") if r.get("val_loss")]
    assert len(val) == 3 and all(math.isfinite(v) for v in val)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_gradient_with_a_finite_loss_stops_or_is_skipped(mode, tmp_path, monkeypatch):
    def poison(self):  # on the 3rd optimiser step, one gradient entry becomes NaN
        if self.global_step == 2:
            self.model.readout.mlp[-1].weight.grad[0, 0] = float("nan")

    monkeypatch.setattr(MFLightningModule, "on_after_backward", poison, raising=False)
    config = tiny_config(tmp_path, mode, nonfinite_loss=mode, max_epochs=2)
    if mode == "stop":
        with pytest.raises(FloatingPointError, match=r"gradient of \['model\.readout\.mlp\.\d+\.weight'\] "
                                                     r"is not finite in a batch of \[.*water\.extxyz: frame \d+"):
            train(config)
        assert not (tmp_path / mode / "model.pt").exists()
    else:
        train(config)
        assert _skipped(tmp_path / mode) == [1.0, 1.0]
        # without the check, gradient clipping spreads the NaN into every weight
        assert _all_finite(load_model(tmp_path / mode / "model.pt").state_dict())
        last = torch.load(tmp_path / mode / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert _all_finite(last["state_dict"])


@pytest.mark.parametrize("epoch", [0, 1])
def test_diverged_weights_are_never_saved_as_best(epoch, tmp_path, monkeypatch):
    start_validation = MFLightningModule.on_validation_epoch_start

    def diverge(self):  # the weights become NaN just before this epoch's validation
        if self.current_epoch == epoch:
            with torch.no_grad():
                self.model.readout.mlp[-1].weight.fill_(float("nan"))
        start_validation(self)

    monkeypatch.setattr(MFLightningModule, "on_validation_epoch_start", diverge)
    config = tiny_config(tmp_path, "run", max_epochs=4)
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if epoch == 0:  # nothing finite to keep: no model file, no checkpoint
            with pytest.raises(FloatingPointError, match="training diverged: no finite weights to save"):
                train(config)
            assert not best.exists() and not (tmp_path / "run" / "model.pt").exists()
        else:  # the validation loss is NaN: the run ends, the model is the best finite one (epoch 0)
            model = load_model(train(config))
            saved = torch.load(best, map_location="cpu", weights_only=False)
            assert saved["epoch"] == 0
            for name, w in model.state_dict().items():
                torch.testing.assert_close(w, saved["state_dict"][f"model.{name}"].to(w.dtype), msg=name)
            assert model.metadata["epochs_trained"] < 4  # early stopping saw the NaN
    if epoch == 0:  # Lightning would write the first checkpoint whatever its validation loss
        assert any("not writing checkpoint" in str(w.message) and "best.ckpt" in str(w.message) for w in caught)
    for ckpt in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        assert _all_finite(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])


def test_checkpoint_io_never_writes_nonfinite_weights(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "best.ckpt"
    io.save_checkpoint({"epoch": 0, "state_dict": {"w": torch.ones(3)}}, path)
    with pytest.warns(RuntimeWarning, match=r"not writing checkpoint .*best\.ckpt: the weights \['w'\] are not finite"):
        io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.tensor([1.0, float("inf"), 0.0])}}, path)
    assert torch.load(path, weights_only=False)["epoch"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]


def test_same_seed_same_metrics(tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        train(tiny_config(tmp_path, name, seed=seed, max_epochs=3))
        runs[name] = [(r["epoch"], r["val_loss"], r["val_energy_mae/PBE"], r["val_forces_mae/PBE"])
                      for r in read_metrics(tmp_path / name) if r.get("val_loss")]
    assert len(runs["a"]) == 3
    assert runs["a"] == runs["b"]  # identical, digit for digit
    assert runs["a"] != runs["c"]  # and the seed matters
    wa, wb = (load_model(tmp_path / n / "model.pt").state_dict() for n in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "test_metrics.json").read_text() == (tmp_path / "b" / "test_metrics.json").read_text()


# --- the calculator and overlapping atoms --------------------------------------


@pytest.fixture
def ho_model(make_model):
    return make_model(species=(1, 8), fidelities=("PBE",), dtype=torch.float64, cutoff=3.0)


@pytest.mark.parametrize("min_distance, distance, refused", [
    (0.5, 0.3, True), (0.5, 0.6, False), (0.01, 0.05, False), (0.01, 0.005, True),
    (3.5, 3.2, True),  # beyond the cutoff (3 A): found by a second neighbour search
])
def test_calculator_min_distance_is_configurable(ho_model, min_distance, distance, refused):
    atoms = Atoms("OH", positions=[[0, 0, 0], [distance, 0, 0]])
    atoms.calc = MFCalculator(ho_model, fidelity="PBE", min_distance=min_distance)
    if refused:
        with pytest.raises(ValueError, match=rf"atoms 0 and 1 closer than min_distance={min_distance:g} A "
                                             rf"\(closest {distance:.3f} A\)"):
            atoms.get_potential_energy()
    else:
        assert np.isfinite(atoms.get_potential_energy()) and np.isfinite(atoms.get_forces()).all()


def test_calculator_refuses_an_atom_overlapping_its_own_periodic_image(ho_model):
    atoms = Atoms("H", positions=[[0, 0, 0]], cell=[0.05, 3.0, 3.0], pbc=True)
    atoms.calc = MFCalculator(ho_model, fidelity="PBE")
    with pytest.raises(ValueError, match=r"atom 0 and its periodic image closer than min_distance=0\.1 A "
                                         r"\(closest 0\.050 A\)"):
        atoms.get_potential_energy()


def _module(nonfinite: str) -> MFLightningModule:
    spec = ModelSpec(species=[14], fidelities=["PBE"], cutoff=4.0, channels=8, lmax=1, num_layers=1)
    training = TrainingConfig(lr=1e-3, max_epochs=1, nonfinite_loss=nonfinite)
    module = MFLightningModule(MFPotential(spec), training, [[1.0, 1.0, 0.0]])
    module.train_structures = [SimpleNamespace(source="a.xyz: frame 0"), SimpleNamespace(source="a.xyz: frame 7")]
    with torch.no_grad():  # a diverged model
        module.model.readout.mlp[-1].bias.fill_(float("nan"))
    return module


def _batch(si_cell):
    atoms = si_cell.copy()
    atoms.info.update(fidelity="PBE", energy=-10.0)
    s = structure_from_atoms(atoms)
    dataset = GraphDataset([s, s], 4.0, ["PBE"])
    return collate([dataset[0], dataset[1]])


def test_nonfinite_loss_stops_naming_the_structures(si_cell):
    module = _module("stop")
    with pytest.raises(FloatingPointError, match=r"a\.xyz: frame 0.*a\.xyz: frame 7"):
        module.training_step(_batch(si_cell), 0)


def test_nonfinite_loss_can_skip_and_count(si_cell):
    module = _module("skip")
    assert module.training_step(_batch(si_cell), 0) is None
    assert module.skipped_batches == 1


def test_training_with_ema_writes_a_working_model(tmp_path, data_dir, capsys):
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "data": {"root": str(data_dir), "files": [{
            "path": "malonaldehyde/GFN2-xTB.extxyz", "index": "0:60",
            "split": {"train": 40, "val": 10, "test": 10}}]},
        "model": {"cutoff": 4.0, "channels": 8, "lmax": 1, "num_layers": 1},
        "training": {"batch_size": 10, "max_epochs": 3, "ema_decay": 0.9},
    }
    path = tmp_path / "ema.yaml"
    path.write_text(yaml.safe_dump(cfg))
    model_path = train(path)
    assert {int(r["epoch"]) for r in read_metrics(tmp_path / "run")} == {0, 1, 2}
    # not a terminal: one summary line per epoch, with this epoch's validation MAEs
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(" (")[0] for ln in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    # each epoch's wall seconds, to 0.1 s (a 4-step epoch of this tiny model can print 0.0)
    assert all(float(ln.split("(")[1].split(" s)")[0]) >= 0 for ln in lines)
    assert all("val_loss" in ln and "energy_mae/GFN2-xTB" in ln for ln in lines)
    calc = MFCalculator(model_path, fidelity="GFN2-xTB")
    from ase.io import read

    atoms = read(data_dir / "malonaldehyde/GFN2-xTB.extxyz", 55)
    reference = atoms.get_potential_energy()
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy())
    assert abs(atoms.get_potential_energy() - reference) < 5.0  # eV; E0 puts it on the right scale


def test_the_cached_list_ema_gives_the_weights_of_lightnings_averaging(tmp_path, data_dir, monkeypatch):
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    import mfmlip.training.run as run

    def trained(name):
        cfg = {
            "seed": 3, "output_dir": str(tmp_path / name),
            "data": {"root": str(data_dir), "files": [{
                "path": "malonaldehyde/GFN2-xTB.extxyz", "index": "0:50", "split": {"train": 40, "val": 10}}]},
            "model": {"cutoff": 4.0, "channels": 8, "lmax": 1, "num_layers": 1, "dtype": "float64"},
            "training": {"batch_size": 10, "max_epochs": 3, "ema_decay": 0.7},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return torch.load(train(path), weights_only=False)["state_dict"]

    ours = trained("ours")
    monkeypatch.setattr(run, "ExponentialAverage",
                        lambda decay: WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(decay)))
    reference = trained("reference")
    assert ours.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-12, atol=1e-14, msg=name)
    last = torch.load(tmp_path / "ours" / "checkpoints" / "last.ckpt", weights_only=False)
    current, averaged = last["current_model_state"], last["state_dict"]
    moved = [n for n, v in averaged.items() if v.is_floating_point() and not torch.equal(v, current[n])]
    assert moved  # the average is not the last weights: it did average


def test_evaluate_reports_stress_when_labels_have_it(make_model, si_cell):
    model = make_model(species=(14,), fidelities=("PBE",))
    structures = []
    for seed in range(3):
        atoms = si_cell.copy()
        atoms.rattle(0.02, seed=seed)
        stress = predict(model, atoms, stress=True)[K.STRESS][0].numpy()
        atoms.info.update(fidelity="PBE", energy=0.0, stress=(stress + 1e-3).ravel())
        structures.append(structure_from_atoms(atoms))
    metrics, _ = evaluate(model, structures)
    assert metrics["PBE"]["stress_mae"] == pytest.approx(1.0, rel=1e-6)  # 1e-3 eV/A^3 = 1 meV/A^3
    assert metrics["PBE"]["stress_n"] == 27


def test_calculator_keeps_the_dtype_of_a_model_object(make_model, si_cell):
    model = make_model(species=(14,))
    MFCalculator(model, fidelity="PBE")
    assert model.dtype == torch.float64
