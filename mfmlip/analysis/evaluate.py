"""Predict labelled structures with a trained model; metrics and parity plots."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from mfmlip import keys as K
from mfmlip.analysis.figures import new_figure, save_figure
from mfmlip.analysis.metrics import MetricAccumulator
from mfmlip.data.structures import Structure
from mfmlip.model.inference import Predictor, label_fidelity


def evaluate(
    model,
    structures: list[Structure],
    fidelity: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    stress: bool | None = None,
) -> tuple[dict, dict]:
    """Predict every structure and compare with its labels.

    Parameters
    ----------
    model : a :class:`~mfmlip.model.interface.Potential` or a model file path.
    fidelity : predict all structures at this fidelity; if None, each at its own.
    stress : also predict stress; default: when any structure has a stress label.

    Returns
    -------
    metrics : ``{label fidelity: {"energy_mae": meV/atom, "forces_mae": meV/A, ...}}``
    pairs : ``{label fidelity: {"energy": (pred, ref), "forces": (pred, ref)}}``: energies
        per atom above the model's E0 reference (eV/atom), force components (eV/A)

    Raises
    ------
    ValueError
        No structures, or an unknown fidelity or element.
    """
    if not structures:
        raise ValueError("no structures to evaluate")
    if stress is None:
        stress = any(s.stress is not None for s in structures)
    names = list(dict.fromkeys(s.fidelity for s in structures))
    groups = {fidelity: structures} if fidelity is not None else {
        name: [s for s in structures if s.fidelity == name] for name in names
    }
    predictor = Predictor(model, next(iter(groups), None), device)
    acc = MetricAccumulator(names)
    pairs = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for name, group in groups.items():
        predictor.set_fidelity(name)
        for chunk, batch, pred in predictor.predict(group, batch_size, stress=stress):
            acc.update(pred, label_fidelity(batch, chunk, names))
            _collect(pairs, pred, batch, chunk, _e0_sum(predictor.model, batch))
    arrays = {
        fid: {q: (np.concatenate(p), np.concatenate(r)) for q, (p, r) in d.items() if p}
        for fid, d in pairs.items()
    }
    return acc.compute(), arrays


def _e0_sum(model, batch: dict) -> torch.Tensor:
    """(n_graphs,) sum of the E0 of each structure's atoms at its fidelity, eV."""
    fid_atom = batch[K.FIDELITY][batch[K.BATCH]]
    e0_atom = model.e0[fid_atom, model.species_index(batch[K.ATOMIC_NUMBERS])].to(batch[K.ENERGY].dtype)
    return torch.zeros_like(batch[K.ENERGY]).index_add(0, batch[K.BATCH], e0_atom)


def _collect(pairs, pred, batch, chunk, e0_sum) -> None:
    n = batch[K.N_ATOMS].cpu().numpy()
    e0_sum = e0_sum.detach().cpu().numpy()
    e_pred = (pred[K.ENERGY].cpu().numpy() - e0_sum) / n
    e_ref = (batch[K.ENERGY].cpu().numpy() - e0_sum) / n
    e_mask = batch[K.ENERGY_MASK].cpu().numpy()
    f_pred, f_ref = pred[K.FORCES].cpu().numpy(), batch[K.FORCES].cpu().numpy()
    f_mask = batch[K.FORCES_MASK].cpu().numpy()
    graph = batch[K.BATCH].cpu().numpy()
    for g, s in enumerate(chunk):
        if e_mask[g]:
            pairs[s.fidelity]["energy"][0].append(e_pred[g : g + 1])
            pairs[s.fidelity]["energy"][1].append(e_ref[g : g + 1])
        atoms = (graph == g) & f_mask
        if atoms.any():
            pairs[s.fidelity]["forces"][0].append(f_pred[atoms].ravel())
            pairs[s.fidelity]["forces"][1].append(f_ref[atoms].ravel())


def parity_plot(pairs: dict, path: str | Path, title: str = "") -> Path:
    """One PNG: a row per label fidelity, energy (meV/atom above the E0
    reference, so composition does not dominate) and force (eV/Angstrom) parity panels."""
    rows = list(pairs)
    columns = [q for q in ("energy", "forces") if any(q in pairs[f] for f in rows)]
    fig, axes = new_figure(len(rows), len(columns), figsize=(4.5 * len(columns), 4.2 * len(rows)), squeeze=False)
    for row, fid in enumerate(rows):
        for col, q in enumerate(columns):
            ax = axes[row, col]
            if q not in pairs[fid]:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"no {q.rstrip('s')} labels", ha="center", va="center", transform=ax.transAxes)
                continue
            pred, ref = pairs[fid][q]
            if q == "energy":
                pred, ref = pred * 1000, ref * 1000
                unit = "meV/atom above E0"
            else:
                unit = "eV/Å"
            lo, hi = min(pred.min(), ref.min()), max(pred.max(), ref.max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.scatter(ref, pred, s=3, alpha=0.4)
            mae = np.abs(pred - ref).mean() * (1 if q == "energy" else 1000)
            ax.set_title(f"{fid}: {q}, MAE {mae:.2f} {'meV/atom' if q == 'energy' else 'meV/Å'}")
            ax.set_xlabel(f"reference {q} [{unit}]")
            ax.set_ylabel(f"predicted {q} [{unit}]")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
