"""Fine-tuning a universal SevenNet model with new fidelities and replay (tiny runs)."""

import numpy as np
import pytest
import torch
import yaml

from mfmlip import keys as K
from mfmlip.model import SevenNetPotential, load_model
from mfmlip.model.inference import Predictor
from mfmlip.training.config import ConfigError, load_config, resolve_data_root
from mfmlip.training.data import prepare_data
from mfmlip.training.run import REPLAY_GROUP, _init_from_model, _train_order, read_metrics, train

HIGH = "CCSD(T)/CBS"


def _config(tmp_path, name="ft", **training):
    cfg = {
        "output_dir": str(tmp_path / name),
        "data": {"files": [{"path": "malonaldehyde/CCSDT_CBS.extxyz", "index": "0:8",
                            "split": {"train": 4, "val": 2, "test": 2}}]},
        "training": {"init_from": "sevenn:7net-mf-0", "new_fidelity_like": "R2SCAN", "batch_size": 2,
                     "eval_batch_size": 4, "max_epochs": 1, "max_steps": 2, "val_interval_steps": 2, "lr": 1e-4,
                     "weights": {"energy": 1.0, "forces": 1.0}, **training},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_new_fidelity_starts_at_its_data_mean_through_its_fitted_e0(tmp_path, data_dir):
    cfg = load_config(_config(tmp_path))
    data = prepare_data(cfg, resolve_data_root(cfg, data_dir))
    model, original = _init_from_model(cfg, data)
    assert original == ["R2SCAN", "PBE"]
    assert isinstance(model, SevenNetPotential) and model.fidelities == ["R2SCAN", "PBE", HIGH]
    train = data.splits["train"]
    pred = next(Predictor(model, HIGH).predict(train, forces=False))[2][K.ENERGY].double().numpy()
    ref = np.array([s.energy for s in train])
    # CCSD(T) energies are relative (~0 eV); R2SCAN totals of C3H4O2 are ~ -60 eV: the E0 moved them
    assert abs(np.mean(pred - ref)) < 1e-3
    # the copied fidelities are untouched: an element the data lacks keeps R2SCAN's shift in the new row
    si = model.species_index(torch.tensor([14]))
    assert torch.equal(model.e0[2, si], model.e0[0, si])


def test_each_new_fidelity_starts_as_a_copy_of_the_fidelity_mapped_to_it(tmp_path, data_dir):
    path = _config(tmp_path, new_fidelity_like={HIGH: "R2SCAN", "GFN2-xTB": "PBE"})
    raw = yaml.safe_load(path.read_text())
    raw["data"]["files"].insert(0, {"path": "malonaldehyde/GFN2-xTB.extxyz", "index": "0:4",
                                    "split": {"train": 4, "val": 0, "test": 0}})
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    data = prepare_data(cfg, resolve_data_root(cfg, data_dir))
    model, _ = _init_from_model(cfg, data)
    structures = data.splits["train"][:2]

    def forces(fidelity):
        return torch.cat([p[K.FORCES] for _, _, p in Predictor(model, fidelity).predict(structures)])

    # one composition, so the fitted E0 rows shift energies only: the forces are the copied fidelity's
    torch.testing.assert_close(forces(HIGH), forces("R2SCAN"))
    torch.testing.assert_close(forces("GFN2-xTB"), forces("PBE"))
    assert not torch.allclose(forces("PBE"), forces("R2SCAN"))


def test_a_new_fidelity_like_mapping_must_name_every_new_fidelity():
    from mfmlip.training.run import _like_per_fidelity

    assert _like_per_fidelity("PBE", ["MP2", "r2SCAN"], ["R2SCAN", "PBE"]) == {"MP2": "PBE", "r2SCAN": "PBE"}
    with pytest.raises(ConfigError, match="new fidelities are"):
        _like_per_fidelity({"MP2": "R2SCAN"}, ["MP2", "r2SCAN"], ["R2SCAN", "PBE"])
    with pytest.raises(ConfigError, match="not among init_from's fidelities"):
        _like_per_fidelity({"MP2": "r2SCAN"}, ["MP2"], ["R2SCAN", "PBE"])


def test_fine_tuning_with_replay_keeps_the_replayed_fidelities_in_training(tmp_path, data_dir, capsys):
    config = _config(tmp_path, replay={"share": 0.5, "val": 0.25}, freeze=["net.onehot_to_feature_x"])
    model = load_model(train(config, data_root=data_dir))
    original = load_model("sevenn:7net-mf-0")
    assert model.fidelities == ["R2SCAN", "PBE", HIGH]
    # 4 training geometries, one held out, each labelled at PBE and R2SCAN
    assert "replay: 6 training and 2 validation labels" in capsys.readouterr().out
    torch.testing.assert_close(model.net.onehot_to_feature_x.linear.weight,
                               original.net.onehot_to_feature_x.linear.weight)  # frozen
    changed = model.net._modules["0_convolution"].weight_nn.layer0.weight
    assert not torch.equal(changed, original.net._modules["0_convolution"].weight_nn.layer0.weight)
    columns = set().union(*(row.keys() for row in read_metrics(tmp_path / "ft")))
    assert {"val_energy_mae/PBE", "val_energy_mae/R2SCAN"} <= columns  # forgetting, measured while training


class _Graphs(list):
    """What the sampler reads of a GraphDataset: its length and fidelity indices."""

    def fidelity_indices(self) -> list[int]:
        return list(self)


def test_replay_gets_its_share_of_every_epoch(tmp_path, data_dir):
    cfg = load_config(_config(tmp_path, replay={"share": 0.25}))
    data = prepare_data(cfg, resolve_data_root(cfg, data_dir))
    n_own = len(data.splits["train"])
    data.fidelities = ["R2SCAN", "PBE", HIGH]
    graphs = _Graphs([2] * n_own + [0] * 12)  # the user's structures, then 12 replayed at R2SCAN
    sampler = _train_order(cfg, data, graphs, n_own)
    draws = list(sampler)
    assert len(draws) == len(graphs)
    assert sum(i >= n_own for i in draws) == round(0.25 * len(graphs))
    assert REPLAY_GROUP in [int(g) for g in sampler.fids]


def test_replay_needs_a_model_to_replay(tmp_path, data_dir):
    path = _config(tmp_path, replay={"share": 0.2})
    raw = yaml.safe_load(path.read_text())
    del raw["training"]["init_from"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="training.replay needs training.init_from"):
        train(path, data_root=data_dir)


def test_the_foundation_study_method_fine_tunes_the_universal_model_on_all_levels(tmp_path, data_dir):
    from mfmlip.study import load_study
    from mfmlip.study.plan import CachedReader, plan_study
    from test_study import tiny_study

    cfg = load_study(tiny_study(tmp_path, grid={"methods": ["foundation", "single_fidelity"]},
                                quick={"methods": ["foundation", "single_fidelity"]})).reduced()
    plan = plan_study(cfg, data_dir, CachedReader())
    foundation = [r for r in plan.runs if r.method == "foundation"]
    assert foundation and not any(r.method == "low" for r in plan.runs)  # nothing to wait for
    for run in foundation:
        assert run.needs is None and run.config.training.init_from == "sevenn:7net-mf-0"
        assert [f.path for f in run.config.data.files] == ["malonaldehyde/GFN2-xTB.extxyz",
                                                          "malonaldehyde/CCSDT_CBS.extxyz"]


def test_the_ase_replay_set_is_made_of_the_data_elements_only():
    from mfmlip.training.replay import ase_structures

    structures = ase_structures([1, 8, 11, 17])  # NaCl-water
    formulas = {s.source.split()[-1] for s in structures}
    assert {"H2O", "HCl", "Cl2", "ClNa", "Na27"} <= formulas  # G2 molecules; bcc Na, 3x3x3 for >= 16 atoms
    assert all(set(s.atomic_numbers.tolist()) <= {1, 8, 11, 17} for s in structures)
    crystal = next(s for s in structures if s.source.endswith("Na27"))
    assert crystal.pbc.all() and crystal.n_atoms == 27
