"""FidelityShareSampler (training.sampling): shares, determinism, loader, config."""

import numpy as np
import pytest
import torch

from mfmlip import keys as K
from mfmlip.training.config import TrainingConfig
from mfmlip.training.data import make_loader
from mfmlip.training.sampler import FidelityShareSampler

# 950 items of fidelity 0, 50 of fidelity 1 (as xTB vs CCSD(T) in the main job)
FIDS = [0] * 950 + [1] * 50


def shares_of(indices, fids=FIDS):
    counts = np.bincount(np.asarray(fids)[indices], minlength=2)
    return counts / counts.sum()


def test_shares_respected_and_epoch_length_kept():
    sampler = FidelityShareSampler(FIDS, {0: 7.0, 1: 3.0}, seed=0)  # normalised to 0.7 / 0.3
    assert len(sampler) == len(FIDS)
    drawn = list(sampler)
    assert len(drawn) == len(FIDS)
    np.testing.assert_allclose(shares_of(drawn), [0.7, 0.3], atol=1e-3)
    # the rare fidelity is drawn with replacement (300 draws of 50 items), every item 6 times
    rare = np.bincount([i for i in drawn if i >= 950], minlength=1000)[950:]
    assert rare.min() == rare.max() == 6
    # the common one without replacement: 700 distinct items of 950
    common = [i for i in drawn if i < 950]
    assert len(set(common)) == len(common) == 700
    # and the fidelities are mixed through the epoch: each quarter holds ~30% of the rare one
    for quarter in np.array_split(np.asarray(drawn), 4):
        assert abs(shares_of(quarter)[1] - 0.3) < 0.1


def test_uneven_counts_sum_to_num_samples():
    sampler = FidelityShareSampler([0, 0, 1, 2, 2, 2], {0: 1.0, 1: 1.0, 2: 1.0}, num_samples=10)
    assert sorted(sampler.counts) == [3, 3, 4]
    assert sum(sampler.counts) == len(list(sampler)) == 10


def test_order_depends_only_on_seed_and_epoch():
    def order(seed, epoch, fresh_draws=0):
        s = FidelityShareSampler(FIDS, {0: 0.7, 1: 0.3}, seed=seed)
        for _ in range(fresh_draws):  # iterating before must not change the order
            list(s)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 3) == order(0, 3, fresh_draws=2)
    assert order(0, 3) != order(0, 4)
    assert order(0, 3) != order(1, 3)
    # the default (uniform) shuffle's global RNG plays no part
    torch.manual_seed(123)
    a = order(0, 5)
    torch.manual_seed(456)
    assert order(0, 5) == a


def test_loader_with_num_workers_0_yields_every_draw():
    # minimal graphs: one atom, no edges, the fidelity index (what collate needs), the position
    graphs = [{K.N_ATOMS: torch.tensor([1]), K.EDGE_INDEX: torch.zeros(2, 0, dtype=torch.long),
               K.FIDELITY: torch.tensor([f]), K.STRUCTURE_INDEX: torch.tensor([i])} for i, f in enumerate(FIDS)]
    sampler = FidelityShareSampler(FIDS, {0: 0.5, 1: 0.5}, seed=2)
    loader = make_loader(graphs, batch_size=32, shuffle=True, num_workers=0, sampler=sampler)
    assert loader.sampler is sampler and len(loader) == -(-len(FIDS) // 32)
    sampler.set_epoch(1)
    batches = list(loader)
    seen = torch.cat([b[K.STRUCTURE_INDEX] for b in batches]).tolist()
    assert seen == list(sampler)
    assert torch.cat([b[K.FIDELITY] for b in batches]).tolist() == [FIDS[i] for i in seen]
    np.testing.assert_allclose(shares_of(seen), [0.5, 0.5], atol=1e-3)


def test_bad_shares_raise():
    with pytest.raises(ValueError, match="> 0"):
        FidelityShareSampler(FIDS, {0: 1.0, 1: 0.0})
    with pytest.raises(ValueError, match="no sampling share"):
        FidelityShareSampler(FIDS, {0: 1.0})
    with pytest.raises(ValueError, match="with no items"):
        FidelityShareSampler(FIDS, {0: 1.0, 1: 1.0, 2: 1.0})


def test_config_normalises_and_validates_shares():
    t = TrainingConfig(sampling={"CCSD(T)/CBS": 3, "GFN2-xTB": 7})
    assert t.sampling == pytest.approx({"CCSD(T)/CBS": 0.3, "GFN2-xTB": 0.7})
    with pytest.raises(ValueError):
        TrainingConfig(sampling={"CCSD(T)/CBS": 0.0, "GFN2-xTB": 1.0})
    with pytest.raises(ValueError):
        TrainingConfig(monitor="train_loss")
