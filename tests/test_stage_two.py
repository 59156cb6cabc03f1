"""training.stage_two: other loss weights and sampling shares for the last epochs."""

import ase.io
import pytest
import torch
from pydantic import ValidationError
from tiny_runs import labelled_water, tiny_config

from mfmlip.training.config import TrainingConfig
from mfmlip.training.data import EpochShuffle
from mfmlip.training.module import MFLightningModule
from mfmlip.training.run import train
from mfmlip.training.sampler import FidelityShareSampler, TwoStageOrder

pytestmark = pytest.mark.usefixtures("data_root_from_the_config")

HI = "CCSD(T)"
MONITOR = f"val_energy_mae/{HI}"


def test_stage_two_weights_override_per_key_and_keep_the_rest():
    t = TrainingConfig(
        weights={"energy": 10.0, "forces": 1.0}, fidelity_weights={HI: {"energy": 200.0}}, monitor=MONITOR,
        max_epochs=10,
        stage_two={"start_epoch": 7, "weights": {"forces": 0.5}, "fidelity_weights": {HI: {"energy": 1000.0}},
                   "sampling": {HI: 3, "PBE": 7}},
    )
    assert t.weights_for("PBE") == t.weights_for("PBE", 1) == (10.0, 1.0, 0.0)
    assert t.weights_for(HI) == (200.0, 1.0, 0.0)
    assert t.weights_for("PBE", 2) == (10.0, 0.5, 0.0)  # the base forces weight of stage two
    assert t.weights_for(HI, 2) == (1000.0, 0.5, 0.0)  # its own energy, the base forces
    assert t.stage_two.sampling == pytest.approx({HI: 0.3, "PBE": 0.7})
    assert TrainingConfig().weights_for("PBE", 2) == TrainingConfig().weights_for("PBE")  # no stage two


def test_stage_two_needs_a_comparable_monitor_and_a_start_inside_the_run():
    with pytest.raises(ValidationError, match="val_loss of the two stages does not compare"):
        TrainingConfig(max_epochs=10, stage_two={"start_epoch": 5})
    with pytest.raises(ValidationError, match="start_epoch 10 is not before max_epochs 10"):
        TrainingConfig(max_epochs=10, monitor=MONITOR, stage_two={"start_epoch": 10})
    with pytest.raises(ValidationError):
        TrainingConfig(max_epochs=10, monitor=MONITOR, stage_two={"start_epoch": 5, "sampling": {HI: 0.0}})


def test_two_stage_order_switches_at_its_start_epoch():
    fids = [0] * 90 + [1] * 10
    first, second = EpochShuffle(100, seed=1), FidelityShareSampler(fids, {0: 0.5, 1: 0.5}, seed=1)
    order = TwoStageOrder(first, second, start_epoch=3)
    order.set_epoch(2)
    assert list(order) == list(first) and sum(i >= 90 for i in order) == 10
    order.set_epoch(3)
    assert list(order) == list(second) and sum(i >= 90 for i in order) == 50
    assert len(order) == 100
    with pytest.raises(ValueError, match="draw 100 and 50 items"):
        TwoStageOrder(first, FidelityShareSampler(fids, {0: 1, 1: 1}, num_samples=50), 3)


def test_training_switches_weights_and_draws_at_the_start_epoch(tmp_path, capsys):
    # 24 PBE molecules with energies and forces, 12 of a high level with energies only
    ase.io.write(tmp_path / "water.extxyz", [labelled_water(k) for k in range(24)], format="extxyz")
    high = [labelled_water(100 + k, fidelity=HI) for k in range(12)]
    for atoms in high:
        atoms.calc.results.pop("forces")
    ase.io.write(tmp_path / "high.extxyz", high, format="extxyz")
    files = [{"path": "water.extxyz", "split": {"train": None, "val": 4, "test": 0}},
             {"path": "high.extxyz", "split": {"train": None, "val": 4, "test": 0}}]
    two = {"start_epoch": 2, "fidelity_weights": {HI: {"energy": 50.0}}, "sampling": {HI: 0.5, "PBE": 0.5}}
    drawn, validated = [], {}
    original_order, original_step = TwoStageOrder.__iter__, MFLightningModule.validation_step

    def recording(self):  # how many high-level draws, per epoch
        order = list(original_order(self))
        drawn.append(sum(i >= 20 for i in order))  # the 20 PBE training structures come first
        return iter(order)

    def weights_at_validation(self, batch, batch_idx):
        validated[self.current_epoch] = sorted(self.loss_fn.weights.tolist())
        return original_step(self, batch, batch_idx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TwoStageOrder, "__iter__", recording)
        mp.setattr(MFLightningModule, "validation_step", weights_at_validation)
        # with EMA: its callback swaps averaged buffers in for validation, the loss weights among them
        train(tiny_config(tmp_path, "run", files=files, max_epochs=4, monitor=MONITOR, stage_two=two,
                          weights={"energy": 1.0, "forces": 1.0}, ema_decay=0.5))
    assert "stage two from epoch 3" in capsys.readouterr().out
    assert drawn == [8, 8, 14, 14]  # 8 of 28 draws by count, then half of them
    one, two = [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], [[1.0, 1.0, 0.0], [50.0, 1.0, 0.0]]
    assert list(validated.values()) == [one, one, two, two]  # each stage's validation loss is its own, not an average
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    weights = last["state_dict"]["loss_fn.weights"]  # rows in the model's fidelity order
    assert sorted(weights.tolist()) == [[1.0, 1.0, 0.0], [50.0, 1.0, 0.0]]
