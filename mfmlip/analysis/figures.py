"""The one place mfmlip makes and writes matplotlib figures.

Figures are plain :class:`matplotlib.figure.Figure` objects, not registered
with pyplot: no backend is chosen or switched (a user's interactive backend is
left alone) and no display is needed. Writing a file renders it with the
canvas of its format (Agg for PNG).
"""

from __future__ import annotations

from pathlib import Path


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (5.5, 4.0), squeeze: bool = True,
               **subplots_options):
    """A figure with a grid of axes, made without pyplot.

    Parameters
    ----------
    nrows, ncols : int
        Rows and columns of axes.
    figsize : (float, float)
        Width and height, inches.
    squeeze : bool
        As in :meth:`matplotlib.figure.Figure.subplots`: one axes object for a
        1 x 1 grid, a 1D array for a single row or column; ``False`` always
        gives a 2D array.
    **subplots_options
        Passed to :meth:`~matplotlib.figure.Figure.subplots` (e.g. ``sharex``).

    Returns
    -------
    (matplotlib.figure.Figure, Axes or ndarray of Axes)
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze, **subplots_options)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out ``fig`` and write it to ``path`` (folders created); returns the path.

    The format follows the file suffix (e.g. ``.png``); ``dpi`` in dots per inch.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
