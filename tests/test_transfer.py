import numpy as np
import pytest
import torch
import yaml

from mfmlip.model import load_model
from mfmlip.training.config import ConfigError
from mfmlip.training.run import train

MODEL = {"cutoff": 4.0, "channels": 8, "lmax": 1, "num_layers": 2}


def _write(tmp_path, name, files, **training):
    cfg = {"output_dir": str(tmp_path / name), "data": {"files": files}, "model": MODEL,
           "training": {"batch_size": 16, "max_epochs": 2, **training}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("transfer")
    low = [{"path": "malonaldehyde/GFN2-xTB.extxyz", "index": "0:80", "split": {"train": 64, "val": 16}}]
    return tmp, train(_write(tmp, "low", low), data_root=data_dir)


def test_fine_tuning_adds_the_new_fidelity_and_keeps_frozen_modules(pretrained, data_dir):
    tmp, low_path = pretrained
    high = [{"path": "malonaldehyde/CCSDT_CBS.extxyz", "index": "0:80",
             "split": {"train": 48, "val": 16, "test": 16}}]
    cfg = _write(tmp, "high", high, init_from=str(low_path), new_fidelity_like="GFN2-xTB",
                 freeze=["embedding"], weights={"energy": 1.0, "forces": 0.0})
    low, high_model = load_model(low_path), load_model(train(cfg, data_root=data_dir))
    assert high_model.fidelities == ["GFN2-xTB", "CCSD(T)/CBS"]
    torch.testing.assert_close(high_model.embedding.weight, low.embedding.weight)  # frozen
    trained = dict(high_model.named_parameters())["blocks.0.radial_mlp.layer0.weight"]
    assert not torch.allclose(trained, dict(low.named_parameters())["blocks.0.radial_mlp.layer0.weight"])
    # CCSD(T) energies are relative (~0 eV), xTB totals ~ -450 eV: the new E0 row was fitted, not copied
    e0 = high_model.e0_table()
    assert abs(e0[1] @ np.array([4, 3, 2])) < 5.0 < abs(e0[0] @ np.array([4, 3, 2]))


def test_unknown_freeze_target_is_named(pretrained, data_dir):
    tmp, low_path = pretrained
    files = [{"path": "malonaldehyde/GFN2-xTB.extxyz", "index": "0:40", "split": {"train": 30, "val": 10}}]
    cfg = _write(tmp, "bad", files, init_from=str(low_path), freeze=["embeding"])
    with pytest.raises(ConfigError, match="'embeding' matches no parameter"):
        train(cfg, data_root=data_dir)


def test_fine_tuning_trains_in_train_mode_so_forces_reach_the_weights(pretrained, data_dir, monkeypatch):
    # a loaded model comes in eval mode, whose forces keep no graph: the force loss would be dead
    from mfmlip.training.module import MFLightningModule

    modes = []
    original = MFLightningModule.training_step

    def record(self, batch, batch_idx):
        modes.append(self.model.training)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(MFLightningModule, "training_step", record)
    tmp, low_path = pretrained
    files = [{"path": "malonaldehyde/GFN2-xTB.extxyz", "index": "80:120", "split": {"train": 30, "val": 10}}]
    train(_write(tmp, "forces", files, init_from=str(low_path), max_epochs=1), data_root=data_dir)
    assert modes and all(modes)
