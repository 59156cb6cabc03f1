import numpy as np
import pytest
import torch
import yaml

from conftest import predict
from mfmlip import MFCalculator
from mfmlip import keys as K
from mfmlip.analysis.evaluate import evaluate
from mfmlip.data.graph import collate, structure_to_graph
from mfmlip.data.structures import structure_from_atoms
from mfmlip.training.data import GraphDataset
from mfmlip.training.module import MFLightningModule
from mfmlip.training.run import read_metrics, train

OPTIM = dict(lr=1e-3, min_lr_ratio=0.01, optimizer="adam", weight_decay=0.0, max_epochs=1,
             loss="mse", huber_delta=0.01)


def _module(nonfinite: str) -> MFLightningModule:
    hparams = dict(species=[14], fidelities=["PBE"], cutoff=4.0, channels=8, lmax=1, num_layers=1)
    module = MFLightningModule(hparams, [[1.0, 1.0, 0.0]], dict(OPTIM, nonfinite_loss=nonfinite))
    module.train_sources = ["a.xyz: frame 0", "a.xyz: frame 7"]
    with torch.no_grad():  # a diverged model
        module.model.readout.mlp[-1].bias.fill_(float("nan"))
    return module


def _batch(si_cell):
    atoms = si_cell.copy()
    atoms.info.update(fidelity="PBE", energy=-10.0)
    graph = structure_to_graph(structure_from_atoms(atoms), 4.0, 0)
    dataset = GraphDataset([graph, graph])
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
    assert [ln.split(",")[0] for ln in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("val_loss" in ln and "energy_mae/GFN2-xTB" in ln for ln in lines)
    calc = MFCalculator(model_path, fidelity="GFN2-xTB")
    from ase.io import read

    atoms = read(data_dir / "malonaldehyde/GFN2-xTB.extxyz", 55)
    reference = atoms.get_potential_energy()
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy())
    assert abs(atoms.get_potential_energy() - reference) < 5.0  # eV; E0 puts it on the right scale


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
