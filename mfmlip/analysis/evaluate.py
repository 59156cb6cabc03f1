"""Predict labelled structures with a trained model; metrics and parity plots."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from mfmlip import keys as K
from mfmlip.analysis.figures import save_figure
from mfmlip.analysis.metrics import MetricAccumulator
from mfmlip.data.graph import collate, structure_to_graph, to_device
from mfmlip.data.structures import Structure
from mfmlip.model.potential import MFPotential


def evaluate(
    model: MFPotential,
    structures: list[Structure],
    fidelity: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    stress: bool | None = None,
) -> tuple[dict, dict]:
    """Predict every structure and compare with its labels.

    Parameters
    ----------
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
        Unknown fidelity or element.
    """
    if stress is None:
        stress = any(s.stress is not None for s in structures)
    names = list(dict.fromkeys(s.fidelity for s in structures))
    acc = MetricAccumulator(names)
    pairs = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for chunk, batch, pred in predict_batches(model, structures, fidelity, batch_size, device, stress):
        label_batch = dict(batch, **{K.FIDELITY: torch.tensor([names.index(s.fidelity) for s in chunk], device=device)})
        acc.update(pred, label_batch)
        _collect(pairs, pred, batch, chunk, _e0_sum(model, batch))
    arrays = {
        fid: {q: (np.concatenate(p), np.concatenate(r)) for q, (p, r) in d.items() if p}
        for fid, d in pairs.items()
    }
    return acc.compute(), arrays


def predict_batches(model, structures: list[Structure], fidelity: str | None = None, batch_size: int = 64,
                    device: str | torch.device = "cpu", stress: bool = False):
    """Yield ``(structures, batch, prediction)`` chunk by chunk, predicted at
    ``fidelity`` (each structure at its own if None); prediction keys and shapes
    as :meth:`MFPotential.forward`, detached; the batch carries the labels.

    Raises
    ------
    ValueError
        Unknown fidelity or element.
    """
    model = model.to(device).eval()
    forced = None if fidelity is None else model.fidelity_index(fidelity)
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        graphs = [
            structure_to_graph(s, model.cutoff, forced if forced is not None else model.fidelity_index(s.fidelity))
            for s in chunk
        ]
        batch = to_device(collate(graphs), device, model.dtype)
        try:
            pred = model(batch, compute_forces=True, compute_stress=stress)
        except ValueError as err:  # e.g. an unknown element: say which structures
            raise ValueError(f"{chunk[0].source} .. {chunk[-1].source}: {err}") from err
        yield chunk, batch, {k: v.detach() for k, v in pred.items()}


def _e0_sum(model: MFPotential, batch: dict) -> torch.Tensor:
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(pairs)
    columns = [q for q in ("energy", "forces") if any(q in pairs[f] for f in rows)]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(4.5 * len(columns), 4.2 * len(rows)), squeeze=False)
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
