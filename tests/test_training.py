import json
from collections import defaultdict
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml

from mfmlip import MFCalculator
from mfmlip.cli.main import main
from mfmlip.model import load_model
from mfmlip.atomic_io import atomic_torch_save
from mfmlip.training.run import read_metrics
from mfmlip.training.checkpoint import AtomicCheckpointIO

XTB, CCSDT = "GFN2-xTB", "CCSD(T)/CBS"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def per_epoch(rows: list[dict], column: str) -> dict[int, float]:
    # train_loss is logged per step (every log_every_n_steps), val_loss once per epoch
    values = defaultdict(list)
    for row in rows:
        if row.get(column):
            values[int(row["epoch"])].append(float(row[column]))
    return {epoch: float(np.mean(v)) for epoch, v in sorted(values.items())}


EPOCHS = 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("train")
    cfg = {
        "seed": 0,
        "output_dir": str(tmp / "run"),
        "data": {
            "root": str(data_dir),
            "files": [
                {"path": "malonaldehyde/GFN2-xTB.extxyz", "index": "0:200",
                 "split": {"train": None, "val": 25, "test": 25},
                 "filter": {"max_energy_above_min_per_atom": 0.5}},
                {"path": "malonaldehyde/CCSDT_CBS.extxyz", "index": "0:200",
                 "split": {"train": None, "val": 30, "test": 50}},
            ],
        },
        "model": {"cutoff": 4.0, "channels": 8, "lmax": 1, "num_layers": 2},
        "training": {
            "batch_size": 16, "max_epochs": EPOCHS, "lr": 0.01,
            "weights": {"energy": 1.0, "forces": 1.0},
            "fidelity_weights": {CCSDT: {"energy": 10.0}},
        },
    }
    path = write_config(tmp / "config.yaml", cfg)
    assert main(["train", str(path)]) == 0
    return tmp / "run"


def test_training_writes_all_outputs(trained):
    for name in ("model.pt", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "logs/version_0/metrics.csv",
                 "test_metrics.json", "parity_test.png"):
        assert (trained / name).is_file(), name
    assert (trained / "parity_test.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(trained.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_training_loss_decreases(trained):
    rows = read_metrics(trained)
    train_loss = per_epoch(rows, "train_loss")
    val_loss = per_epoch(rows, "val_loss")
    assert list(train_loss) == list(range(EPOCHS)) and list(val_loss) == list(range(EPOCHS))
    assert all(np.isfinite(v) for v in train_loss.values())
    assert train_loss[EPOCHS - 1] < 0.8 * train_loss[0]
    assert val_loss[EPOCHS - 1] < 0.8 * val_loss[0]
    assert any(f"val_energy_mae/{CCSDT}" in key for key in rows[0])


def test_trained_model_loads_and_predicts_both_fidelities(trained, data_file):
    model = load_model(trained / "model.pt")
    assert model.fidelities == [XTB, CCSDT] and model.species == [1, 6, 8]
    assert model.metadata["epochs_trained"] == EPOCHS
    assert set(model.metadata["e0"]) == {XTB, CCSDT}
    # frame 300 was never read for training (index 0:200)
    ref = {
        XTB: ase.io.read(data_file("malonaldehyde/GFN2-xTB.extxyz"), index=300),
        CCSDT: ase.io.read(data_file("malonaldehyde/CCSDT_CBS.extxyz"), index=300),
    }
    energies = {}
    for fid in (XTB, CCSDT):
        atoms = ref[XTB].copy()
        atoms.calc = MFCalculator(trained / "model.pt", fidelity=fid)
        energies[fid] = atoms.get_potential_energy()
        assert atoms.get_forces().shape == (9, 3)
        # the two levels have totals ~450 eV apart (per-fidelity E0): each
        # prediction must land on its own level
        assert energies[fid] == pytest.approx(ref[fid].get_potential_energy(), abs=1.0)
    assert abs(energies[XTB] - energies[CCSDT]) > 100.0


def test_cli_info_lists_fidelities_with_their_training_labels(trained, capsys):
    counts = load_model(trained / "model.pt").metadata["training_data"]
    assert counts[CCSDT]["structures"] == 120 and counts[CCSDT]["forces"] == 0  # 200 - 30 val - 50 test
    assert counts[XTB]["forces"] == counts[XTB]["structures"] > 0
    assert main(["info", str(trained / "model.pt")]) == 0
    out = capsys.readouterr().out
    assert "species ['H', 'C', 'O'], scheme one_hot_linear" in out
    assert f"'{CCSDT}': 120 training structures (120 energies, 0 forces, 0 stresses); E0 (eV): H " in out
    assert f"'{XTB}': {counts[XTB]['structures']} training structures" in out
    assert "model spec: cutoff=4.0, channels=" in out and "avg_num_neighbors=" in out


def test_test_metrics_report_ccsdt_energy_mae(trained):
    metrics = json.loads((trained / "test_metrics.json").read_text())
    assert set(metrics) == {XTB, CCSDT}
    high = metrics[CCSDT]
    assert high["energy_n"] == 50 and "forces_mae" not in high  # energy-only level
    assert 0.0 < high["energy_mae"] < 100.0  # meV/atom
    assert high["energy_rmse"] >= high["energy_mae"]
    assert metrics[XTB]["energy_n"] == 25 and metrics[XTB]["forces_n"] == 25 * 27


@pytest.mark.parametrize(
    "file, fidelity, quantities",
    [("CCSDT_CBS.extxyz", CCSDT, ["energy"]), ("GFN2-xTB.extxyz", XTB, ["energy", "forces"])],
)
def test_cli_evaluate_writes_parity_png_and_prints_table(trained, data_file, tmp_path, capsys, file, fidelity, quantities):
    out = tmp_path / "eval"
    code = main(["evaluate", str(trained / "model.pt"), str(data_file(f"malonaldehyde/{file}")),
                 "--fidelity", fidelity, "--index", "300:340", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "MAE" in printed and "RMSE" in printed
    for q in quantities:
        assert any(line.startswith(fidelity) and f" {q} " in line for line in printed.splitlines()), printed
    pngs = list(out.glob("parity_*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == PNG_MAGIC
    (metrics_file,) = out.glob("metrics_*.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics[fidelity]["energy_n"] == 40
    assert ("forces_mae" in metrics[fidelity]) == ("forces" in quantities)


# --- resume ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("resume")
    cfg = {
        "seed": 1,
        "output_dir": str(tmp / "run"),
        "data": {"files": [{"path": "malonaldehyde/GFN2-xTB.extxyz", "index": "0:64",
                            "split": {"train": 48, "val": 16, "test": 0}}]},
        "model": {"cutoff": 4.0, "channels": 8, "lmax": 1, "num_layers": 2},
        "training": {"batch_size": 16, "max_epochs": 2},
    }
    first = write_config(tmp / "first.yaml", cfg)
    # --resume without a checkpoint yet starts a fresh run
    assert main(["train", str(first), "--data-root", str(data_dir), "--resume"]) == 0
    first_ckpt = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    cfg["training"]["max_epochs"] = 4
    second = write_config(tmp / "second.yaml", cfg)
    assert main(["train", str(second), "--data-root", str(data_dir), "--resume"]) == 0
    return tmp / "run", first_ckpt


def test_resume_continues_from_last_checkpoint(resumed):
    run, first_ckpt = resumed
    assert first_ckpt["epoch"] == 1 and first_ckpt["global_step"] == 2 * 3  # 48 / 16 = 3 steps per epoch
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # 4 epochs in total (0..3), not 2 + 4 = 6
    assert last["epoch"] == 3 and last["global_step"] == 4 * 3
    assert load_model(run / "model.pt").metadata["epochs_trained"] == 4
    epochs = {int(r["epoch"]) for r in read_metrics(run)}
    assert max(epochs) == 3 and 2 in epochs


def test_resume_keeps_metrics_of_earlier_epochs(resumed):
    run, _ = resumed
    assert {int(r["epoch"]) for r in read_metrics(run)} == {0, 1, 2, 3}


# --- atomic writes ----------------------------------------------------------------


def _failing_save(obj, fh, *args, **kwargs):
    fh.write(b"PARTIAL")  # half a file on disk, then the process dies
    raise RuntimeError("disk full")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_torch_save_keeps_previous_file_on_failure(tmp_path, monkeypatch, exc):
    path = tmp_path / "model.pt"
    atomic_torch_save({"version": 1}, path)
    before = path.read_bytes()

    def failing(obj, fh, *args, **kwargs):
        fh.write(b"PARTIAL")
        raise exc("interrupted mid-write")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(exc):
        atomic_torch_save({"version": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=False) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary left


def test_atomic_torch_save_replaces_and_creates_folders(tmp_path):
    path = tmp_path / "a" / "b" / "x.pt"
    atomic_torch_save({"v": 1}, path)
    atomic_torch_save({"v": 2}, path)
    assert torch.load(path, weights_only=False) == {"v": 2}
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]


def test_checkpoint_io_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 3}, path)
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"epoch": 4}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_decay_over_time_ends_the_cosine_with_the_time_budget(tmp_path, data_dir):
    cfg = {"seed": 0, "output_dir": str(tmp_path / "run"),
           "data": {"root": str(data_dir), "files": [
               {"path": "ethanol/PBE_train.extxyz", "index": "0:40", "split": {"train": None, "val": 8}}]},
           "model": {"cutoff": 4.0, "channels": 4, "lmax": 1, "num_layers": 1},
           "training": {"batch_size": 8, "max_epochs": 100000, "max_time_minutes": 0.05, "decay_over": "time",
                        "lr": 0.01, "min_lr_ratio": 0.01, "patience": 100000}}
    assert main(["train", str(write_config(tmp_path / "config.yaml", cfg))]) == 0
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    lr = last["optimizer_states"][0]["param_groups"][0]["lr"]
    assert last["global_step"] > 5  # many steps, while a step schedule over 100000 epochs would not have moved
    assert 0.01 * 0.01 <= lr < 0.01 * 0.1  # the end of the cosine: the time budget is spent


def test_decay_over_time_needs_a_time_budget():
    from pydantic import ValidationError

    from mfmlip.training.config import TrainingConfig

    with pytest.raises(ValidationError, match="decay_over: time needs max_time_minutes"):
        TrainingConfig(decay_over="time")


def test_a_step_budget_shorter_than_an_epoch_still_validates_and_writes_the_model(tmp_path, data_dir):
    cfg = {"seed": 0, "output_dir": str(tmp_path / "run"),
           "data": {"root": str(data_dir), "files": [
               {"path": "ethanol/PBE_train.extxyz", "index": "0:40", "split": {"train": None, "val": 8}}]},
           "model": {"cutoff": 4.0, "channels": 4, "lmax": 1, "num_layers": 1},
           "training": {"batch_size": 4, "max_steps": 2}}  # 8 batches per epoch
    assert main(["train", str(write_config(tmp_path / "config.yaml", cfg))]) == 0
    assert (tmp_path / "run" / "model.pt").is_file()
    assert any(row.get("val_loss") for row in read_metrics(tmp_path / "run"))
