"""Per-fidelity error metrics: MAE, RMSE and largest absolute error of energy (meV/atom), forces
(meV/Angstrom, per component) and stress (meV/Angstrom^3, per component)."""

from __future__ import annotations

from collections import defaultdict

import torch

from mfmlip import keys as K

UNITS = {"energy": "meV/atom", "forces": "meV/A", "stress": "meV/A^3"}


class MetricAccumulator:
    """Sums of absolute and squared errors, and the largest error, per fidelity and quantity.

    Examples
    --------
    >>> acc = MetricAccumulator(["PBE"])
    >>> acc.add("PBE", "energy", torch.tensor([0.001, -0.003], dtype=torch.float64))
    >>> round(acc.compute()["PBE"]["energy_mae"], 6)
    2.0
    """

    def __init__(self, fidelities: list[str]):
        self.fidelities = list(fidelities)
        self.sums = defaultdict(lambda: torch.zeros(3, dtype=torch.float64))  # |e|, e^2, n
        self.largest = defaultdict(float)

    def add(self, fidelity: str, quantity: str, err: torch.Tensor) -> None:
        """Add errors in eV-based units (converted to meV here)."""
        e = err.detach().double().flatten().cpu() * 1000.0
        self.sums[(fidelity, quantity)] += torch.stack([e.abs().sum(), (e**2).sum(), torch.tensor(float(e.numel()))])
        if e.numel():
            self.largest[(fidelity, quantity)] = max(self.largest[(fidelity, quantity)], float(e.abs().max()))

    def update(self, pred: dict, batch: dict) -> None:
        """Accumulate the errors of one batch, by each structure's label fidelity:
        ``batch["label_fidelity"]`` if given (evaluation at another fidelity),
        else ``batch["fidelity"]``; both index ``self.fidelities``."""
        fid = batch.get(K.LABEL_FIDELITY, batch[K.FIDELITY])
        atom_fid = fid[batch[K.BATCH]]
        for f in fid.unique().tolist():
            g, a = fid == f, atom_fid == f
            name = self.fidelities[f]
            m = batch[K.ENERGY_MASK] & g
            self.add(name, "energy", ((pred[K.ENERGY] - batch[K.ENERGY]) / batch[K.N_ATOMS])[m])
            if K.FORCES in pred:
                m = batch[K.FORCES_MASK] & a
                self.add(name, "forces", (pred[K.FORCES] - batch[K.FORCES])[m])
            if K.STRESS in pred:
                m = batch[K.STRESS_MASK] & g
                self.add(name, "stress", (pred[K.STRESS] - batch[K.STRESS])[m])

    def reduce(self, reduce) -> None:
        """Combine the errors of several processes (DDP validation):
        ``reduce(tensor, op)`` with ``op`` ``"sum"`` or ``"max"`` returns the
        tensor reduced over the processes (e.g. Lightning's ``strategy.reduce``)."""
        keys = [(f, q) for f in self.fidelities for q in UNITS]
        sums = reduce(torch.stack([self.sums[k] for k in keys]), "sum").cpu()
        largest = reduce(torch.tensor([self.largest[k] for k in keys], dtype=torch.float64), "max").cpu()
        for k, total, top in zip(keys, sums, largest.tolist(), strict=True):
            self.sums[k], self.largest[k] = total, top

    def compute(self) -> dict[str, dict[str, float]]:
        """``{fidelity: {"energy_mae", "energy_rmse", "energy_max", "energy_n", ...}}`` (meV units)."""
        out = defaultdict(dict)
        for (fid, q), (abs_sum, sq_sum, n) in self.sums.items():
            if n > 0:
                out[fid][f"{q}_mae"] = float(abs_sum / n)
                out[fid][f"{q}_rmse"] = float((sq_sum / n).sqrt())
                out[fid][f"{q}_max"] = self.largest[(fid, q)]
                out[fid][f"{q}_n"] = int(n)
        return dict(out)


def format_table(metrics: dict[str, dict[str, float]], title: str = "") -> str:
    """Plain-text table: one row per fidelity and quantity, MAE and RMSE."""
    lines = [title] if title else []
    lines.append(f"{'fidelity':<24}{'quantity':<10}{'MAE':>12}{'RMSE':>12}  {'unit':<10}{'n':>8}")
    for fid, m in metrics.items():
        for q in ("energy", "forces", "stress"):
            if f"{q}_mae" in m:
                lines.append(
                    f"{fid:<24}{q:<10}{m[f'{q}_mae']:>12.3f}{m[f'{q}_rmse']:>12.3f}  {UNITS[q]:<10}{m[f'{q}_n']:>8}"
                )
    return "\n".join(lines)
