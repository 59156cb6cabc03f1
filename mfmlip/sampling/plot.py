"""PC1 vs PC2 picture of a selection: every candidate, the clusters, the picks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mfmlip.analysis.figures import new_figure, save_figure
from mfmlip.sampling.select import PCA, Selection, format_region


def plot_selection(selection: Selection, path: str | Path, pca: PCA | None = None, title: str = "") -> Path:
    """Write a PNG of the first two principal components (unweighted scores).

    Candidates are small dots, coloured by cluster for ``direct`` (grey
    otherwise); the selected ones are larger red circles; a ``narrow`` region is
    drawn as a shaded box.

    Parameters
    ----------
    selection : from :func:`mfmlip.sampling.select.sample`.
    path : PNG file to write (folders are created).
    pca : principal components of the candidates, needed when
        ``selection.pca`` is None (``random``).

    Returns
    -------
    the path written.
    """
    from matplotlib import colormaps

    pca = selection.pca if selection.pca is not None else pca
    if pca is None:
        raise ValueError("plot_selection needs the principal components: pass pca=principal_components(vectors)")
    scores = pca.scores
    pc1 = scores[:, 0]
    pc2 = scores[:, 1] if scores.shape[1] > 1 else np.zeros_like(pc1)
    fig, ax = new_figure(figsize=(6, 5))
    if selection.labels is not None:
        cmap = colormaps["tab20"]
        colours = cmap(selection.labels % cmap.N)
        ax.scatter(pc1, pc2, s=4, c=colours, alpha=0.35, linewidths=0,
                   label=f"candidates ({len(pc1)}), {selection.labels.max() + 1} clusters")
    else:
        ax.scatter(pc1, pc2, s=4, c="0.6", alpha=0.5, linewidths=0, label=f"candidates ({len(pc1)})")
    if selection.method == "narrow":
        _shade_region(ax, selection.info["bounds"], pc1, pc2)
    idx = selection.indices
    ax.scatter(pc1[idx], pc2[idx], s=22, facecolors="none", edgecolors="red", linewidths=1.0,
               label=f"selected ({len(idx)})")
    ratio = pca.explained_ratio
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% of variance)" if len(ratio) > 1 else "PC2 (none)")
    ax.set_title(title or f"{selection.method}: {len(idx)} of {len(pc1)} selected", fontsize=10)
    ax.legend(loc="best", fontsize=8, markerscale=2)
    return save_figure(fig, path)


def _shade_region(ax, bounds, pc1, pc2) -> None:
    """Shade the PC1/PC2 part of a ``narrow`` box (bounds on PC3+ are only named)."""
    def side(j, data):
        lo, hi = bounds[j] if j < len(bounds) else (None, None)
        pad = 0.05 * (data.max() - data.min() or 1.0)
        return (data.min() - pad if lo is None else lo), (data.max() + pad if hi is None else hi)

    (x0, x1), (y0, y1) = side(0, pc1), side(1, pc2)
    ax.fill_between([x0, x1], y0, y1, color="tab:blue", alpha=0.12, linewidth=0,
                    label=f"region {format_region(bounds)}")
