"""Per-fidelity sampling shares (``training.sampling``).

By default an epoch draws every training structure once, so a fidelity with
few structures (500 CCSD(T) energies among ~9500 xTB frames) is ~5% of each
batch. :class:`FidelityShareSampler` instead gives each fidelity a fixed share
of an epoch's draws; the epoch keeps its number of draws (hence of batches).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


class FidelityShareSampler(torch.utils.data.Sampler):
    """Indices into a dataset, drawn per fidelity in fixed shares; the order
    depends only on ``(seed, epoch)`` (Lightning calls :meth:`set_epoch` at the
    start of every epoch, so a resumed run sees the same batches).

    Each epoch has ``num_samples`` draws; fidelity ``f`` gets
    ``round(shares[f] * num_samples)`` of them (largest remainder, so the counts
    sum to ``num_samples``). A fidelity drawn more often than it has structures
    goes through whole random permutations of its structures plus part of one
    more (sampling with replacement only as far as needed); one drawn less often
    takes a random subset without replacement. The draws of all fidelities are
    then shuffled together, so each batch holds each fidelity in its share on
    average (binomial spread).

    Parameters
    ----------
    fidelities : (n,) fidelity index of each dataset item (as in the graphs' ``fidelity``).
    shares : ``{fidelity index: share}``, shares > 0; normalised here. Every index in
        ``fidelities`` needs a share.
    num_samples : draws per epoch (default ``n``, an ordinary epoch's length).
    seed : base seed of the random order.

    Raises
    ------
    ValueError
        A share <= 0, a share for a fidelity with no items, or items of a fidelity without a share.
    """

    def __init__(self, fidelities: Sequence[int], shares: Mapping[int, float], num_samples: int | None = None,
                 seed: int = 0):
        fid = np.asarray(fidelities, dtype=np.int64)
        present = set(np.unique(fid).tolist())
        if any(s <= 0 for s in shares.values()):
            raise ValueError(f"sampling shares must be > 0, got {dict(shares)}")
        if set(shares) - present:
            raise ValueError(f"sampling shares for fidelities {sorted(set(shares) - present)} with no items")
        if present - set(shares):
            raise ValueError(f"items of fidelities {sorted(present - set(shares))} have no sampling share")
        self.fids = sorted(shares)
        self.pools = [torch.as_tensor(np.flatnonzero(fid == f)) for f in self.fids]
        total = float(sum(shares.values()))
        self.shares = [shares[f] / total for f in self.fids]
        self.num_samples = len(fid) if num_samples is None else int(num_samples)
        self.counts = self._counts(self.shares, self.num_samples)
        self.seed, self.epoch = seed, 0

    @staticmethod
    def _counts(shares: list[float], n: int) -> list[int]:
        """Draws per fidelity: ``shares * n`` rounded by largest remainder (sum exactly ``n``)."""
        exact = np.asarray(shares) * n
        counts = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
            counts[i] += 1
        return counts.tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draws = []
        for pool, count in zip(self.pools, self.counts, strict=True):
            passes = max(1, -(-count // len(pool)))
            order = torch.cat([pool[torch.randperm(len(pool), generator=g)] for _ in range(passes)])
            draws.append(order[:count])
        draws = torch.cat(draws)
        return iter(draws[torch.randperm(len(draws), generator=g)].tolist())

    def __len__(self) -> int:
        return self.num_samples


class TwoStageOrder(torch.utils.data.Sampler):
    """The draws of ``first`` in the epochs before ``start_epoch`` (0-based), of
    ``second`` from it on (``training.stage_two.sampling``); both are told every epoch.

    Raises
    ------
    ValueError
        The two have different lengths (an epoch keeps its number of batches).
    """

    def __init__(self, first, second, start_epoch: int):
        if len(first) != len(second):
            raise ValueError(f"the two stages draw {len(first)} and {len(second)} items per epoch")
        self.first, self.second, self.start_epoch, self.epoch = first, second, start_epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for sampler in (self.first, self.second):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)

    def __iter__(self):
        return iter(self.second if self.epoch >= self.start_epoch else self.first)

    def __len__(self) -> int:
        return len(self.first)


class RankShard(torch.utils.data.Sampler):
    """One process's part of a global draw order, for training on several
    devices (DDP) with the batches a single process would draw.

    The order of ``sampler`` (the same in every process: it depends only on
    ``(seed, epoch)``) is cut into global batches of ``world * batch_size``
    draws; process ``rank`` takes the ``rank``-th ``batch_size`` draws of each.
    So a step of ``world`` processes sees the global batch one process with
    ``batch_size * world`` would see, and a resumed run sees the same batches.
    With ``pad`` (training) the order is extended by its own beginning to a
    whole number of global batches, so every process takes as many steps;
    without (validation) the processes' parts may differ by a batch.

    Parameters
    ----------
    sampler : the global order (:class:`FidelityShareSampler`,
        :class:`~mfmlip.training.data.EpochShuffle` or any sampler; ``set_epoch`` is passed on).
    batch_size : per process. rank, world : this process, and how many there are.
    """

    def __init__(self, sampler, batch_size: int, rank: int = 0, world: int = 1, pad: bool = True):
        self.sampler, self.batch_size, self.rank, self.world, self.pad = sampler, batch_size, rank, world, pad

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _global_length(self) -> int:
        n, step = len(self.sampler), self.world * self.batch_size
        return -(-n // step) * step if self.pad and self.world > 1 else n

    def __iter__(self):
        if self.world == 1:  # the whole order, as the sampler yields it
            return iter(self.sampler)
        order = list(self.sampler)
        need = self._global_length()
        while len(order) < need:
            order += order[: need - len(order)]
        b, step = self.batch_size, self.world * self.batch_size
        return iter([i for start in range(self.rank * b, need, step) for i in order[start : start + b]])

    def __len__(self) -> int:
        n, b, step = self._global_length(), self.batch_size, self.world * self.batch_size
        full, rest = divmod(n, step)
        return full * b + min(max(rest - self.rank * b, 0), b)
