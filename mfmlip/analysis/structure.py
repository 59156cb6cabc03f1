"""Structure analysis of frames (e.g. an MD trajectory): partial radial distribution
functions, angular distributions of triplets and coordination-number histograms.

Neighbours come from :func:`ase.neighborlist.neighbor_list`, so periodic images
are counted (any cell shape); distances in Angstrom, angles in degrees.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers
from ase.neighborlist import neighbor_list

from mfmlip.analysis.figures import new_figure, save_figure

#: default upper limit of rmax when none is given, Angstrom
RMAX_CAP = 10.0


@dataclass
class RDFResult:
    """Partial radial distribution functions averaged over frames.

    Attributes
    ----------
    r : ndarray, shape (bins,)
        Bin centres, Angstrom.
    edges : ndarray, shape (bins + 1,)
        Bin edges, Angstrom (0 to rmax).
    g : dict
        ``{"A-B": ndarray (bins,)}``, dimensionless g_AB(r).
    n : dict
        ``{"A-B": ndarray (bins,)}``, running coordination number: mean number
        of B atoms within the outer edge of each bin around an A atom.
    n_frames : int
    """

    r: np.ndarray
    edges: np.ndarray
    g: dict
    n: dict
    n_frames: int

    def to_csv(self, path: str | Path) -> Path:
        """Columns ``r_A``, ``g_A-B`` per pair, then ``n_A-B`` per pair."""
        header = ["r_A"] + [f"g_{p}" for p in self.g] + [f"n_{p}" for p in self.n]
        columns = [self.r] + list(self.g.values()) + list(self.n.values())
        return _write_csv(path, header, columns)

    def plot(self, path: str | Path, title: str = "") -> Path:
        """PNG of g(r) for every pair."""
        fig, ax = new_figure(figsize=(5.5, 4))
        for pair, g in self.g.items():
            ax.plot(self.r, g, label=pair)
        ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
        ax.set_xlabel("r (A)")
        ax.set_ylabel("g(r)")
        ax.set_title(title or f"radial distribution function ({self.n_frames} frames)")
        ax.legend()
        return save_figure(fig, path)

    def first_peak(self, pair: str) -> tuple[float, float]:
        """(r in Angstrom, g) of the first local maximum of g_pair reaching at
        least half its largest value (the first coordination shell)."""
        g = self.g[pair]
        padded = np.concatenate([[-np.inf], g, [-np.inf]])
        local = (g > padded[:-2]) & (g >= padded[2:]) & (g >= 0.5 * g.max())
        k = int(np.flatnonzero(local)[0]) if local.any() else int(np.argmax(g))
        return float(self.r[k]), float(g[k])


@dataclass
class ADFResult:
    """Distribution of the angle A-B-C at centre atoms B, averaged over frames.

    Attributes
    ----------
    angles : ndarray, shape (bins,)
        Bin centres, degrees (0-180).
    density : ndarray, shape (bins,)
        Probability density per degree (sums to 1 times the bin width, or all
        zeros if no triplet was found).
    counts : ndarray of int, shape (bins,)
        Number of triplets per bin, all frames together.
    triplet : tuple of str
        (A, B, C); B is the vertex.
    cutoff : float
        B-A and B-C distance cutoff, Angstrom.
    triplets_per_centre : float
        Mean number of triplets around a B atom.
    n_frames : int
    """

    angles: np.ndarray
    density: np.ndarray
    counts: np.ndarray
    triplet: tuple
    cutoff: float
    triplets_per_centre: float
    n_frames: int

    @property
    def name(self) -> str:
        return "-".join(self.triplet)

    def to_csv(self, path: str | Path) -> Path:
        """Columns ``angle_deg``, ``density_per_deg``, ``count``."""
        return _write_csv(path, ["angle_deg", "density_per_deg", "count"], [self.angles, self.density, self.counts])

    def plot(self, path: str | Path, title: str = "") -> Path:
        """PNG of the angle density."""
        fig, ax = new_figure(figsize=(5.5, 4))
        ax.plot(self.angles, self.density)
        ax.set_xlabel(f"angle {self.name} (degrees)")
        ax.set_ylabel("probability density (1/degree)")
        ax.set_xlim(0, 180)
        ax.set_title(title or f"angular distribution {self.name}, cutoff {self.cutoff:g} A")
        return save_figure(fig, path)

    def peaks(self, min_fraction: float = 0.05) -> np.ndarray:
        """Bin centres (degrees) of local maxima of ``counts`` holding at least
        ``min_fraction`` of all triplets, shape (n_peaks,)."""
        c = np.concatenate([[0], self.counts, [0]])
        local = (c[1:-1] > c[:-2]) & (c[1:-1] >= c[2:])
        total = max(self.counts.sum(), 1)
        return self.angles[local & (self.counts >= min_fraction * total)]


@dataclass
class CoordinationResult:
    """Histogram of the number of B neighbours of each A atom within a cutoff.

    Attributes
    ----------
    values : ndarray of int, shape (k,)
        Coordination numbers 0 .. max found.
    counts : ndarray of int, shape (k,)
        Number of A atoms (all frames together) with each coordination number.
    fraction : ndarray, shape (k,)
        ``counts / counts.sum()``.
    mean : float
        Mean coordination number.
    pair : tuple of str
        (A, B).
    cutoff : float
        Angstrom.
    n_frames : int
    """

    values: np.ndarray
    counts: np.ndarray
    fraction: np.ndarray
    mean: float
    pair: tuple
    cutoff: float
    n_frames: int

    @property
    def name(self) -> str:
        return "-".join(self.pair)

    def to_csv(self, path: str | Path) -> Path:
        """Columns ``coordination``, ``count``, ``fraction``."""
        return _write_csv(path, ["coordination", "count", "fraction"], [self.values, self.counts, self.fraction])

    def plot(self, path: str | Path, title: str = "") -> Path:
        """PNG bar chart of the fractions."""
        fig, ax = new_figure(figsize=(5.5, 4))
        ax.bar(self.values, self.fraction)
        ax.set_xlabel(f"coordination number {self.name} (cutoff {self.cutoff:g} A)")
        ax.set_ylabel("fraction of atoms")
        ax.set_title(title or f"{self.name} coordination, mean {self.mean:.3f}")
        return save_figure(fig, path)


def parse_species(text: str | Sequence[str], n: int) -> tuple[str, ...]:
    """``"O-H"`` or ``("O", "H")`` to a tuple of ``n`` element symbols.

    Raises
    ------
    ValueError
        Wrong number of parts or an unknown element symbol.
    """
    parts = tuple(p.strip() for p in (text.split("-") if isinstance(text, str) else text))
    if len(parts) != n:
        raise ValueError(f"expected {n} element symbols joined by '-', e.g. {'-'.join(['O', 'H', 'O'][:n])!r}, "
                         f"got {text!r}")
    for p in parts:
        if p not in atomic_numbers or p == "X":
            raise ValueError(f"unknown element {p!r} in {text!r}")
    return parts


def rdf(
    frames: Atoms | Iterable[Atoms],
    pairs: Sequence[str | Sequence[str]],
    rmax: float | None = None,
    bins: int = 200,
) -> RDFResult:
    """Partial radial distribution functions g_AB(r), averaged over frames.

    Per frame, with N_A and N_B atoms of the two species in cell volume V,
    ``g_AB(r) = V / (N_A (N_B - delta_AB)) * n_AB(r) / (4/3 pi (r_hi^3 - r_lo^3))``
    where n_AB counts ordered pairs (i in A, j in B, j != i) in the shell.
    With ``N_B - delta_AB`` an ideal gas (uncorrelated uniform positions)
    has g = 1 exactly in expectation, for any N; a finite crystal or liquid
    tends to 1 at long range. Frames are averaged with equal weight, each
    normalised with its own volume (correct for NPT trajectories).

    Parameters
    ----------
    frames : ase.Atoms or iterable of ase.Atoms
        3D-periodic frames, n_atoms may differ between frames.
    pairs : sequence
        Pairs such as ``["O-O", "O-H"]`` or ``[("O", "H")]``.
    rmax : float, optional
        Largest distance, Angstrom; at most half the smallest perpendicular
        width of every cell (the minimum-image sphere), so that no atom meets
        its own periodic image. Default: that limit, capped at
        :data:`RMAX_CAP`.
    bins : int
        Number of bins of width ``rmax / bins``.

    Returns
    -------
    RDFResult

    Raises
    ------
    ValueError
        No frames or pairs, a frame not 3D-periodic, ``rmax`` too large for
        a cell, ``bins < 1``, an unknown element, or a species with too few
        atoms in a frame (B absent, or fewer than 2 atoms for A = B).
    """
    frames = _frames(frames)
    parsed = [parse_species(p, 2) for p in pairs]
    if not parsed:
        raise ValueError("no pairs given")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    for k, atoms in enumerate(frames):
        if not bool(np.all(atoms.pbc)) or atoms.cell.rank < 3:
            raise ValueError(f"frame {k}: the RDF is normalised by the cell volume and needs a 3D-periodic cell")
    limit = min(_half_width(a) for a in frames)
    if rmax is None:
        rmax = min(limit, RMAX_CAP)
    if not 0 < rmax <= limit * (1 + 1e-12):
        raise ValueError(f"rmax={rmax} A must be > 0 and at most half the smallest cell width, {limit:.4f} A; "
                         "use a smaller rmax or a supercell")
    edges = np.linspace(0.0, rmax, bins + 1)
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    g = {f"{a}-{b}": np.zeros(bins) for a, b in parsed}
    n = {f"{a}-{b}": np.zeros(bins) for a, b in parsed}
    for k, atoms in enumerate(frames):
        i, j, d = neighbor_list("ijd", atoms, rmax)
        numbers = atoms.numbers
        volume = atoms.get_volume()
        for a, b in parsed:
            za, zb = atomic_numbers[a], atomic_numbers[b]
            n_a, n_b = int(np.sum(numbers == za)), int(np.sum(numbers == zb))
            partners = n_b - (1 if a == b else 0)
            if n_a == 0 or partners < 1:
                need = f"two {a} atoms" if a == b else f"{a} and {b} atoms"
                raise ValueError(f"frame {k}: the {a}-{b} RDF needs {need}; the frame is "
                                 f"{atoms.get_chemical_formula()}")
            mask = (numbers[i] == za) & (numbers[j] == zb)
            hist = np.histogram(d[mask], bins=edges)[0].astype(float)
            g[f"{a}-{b}"] += hist * volume / (n_a * partners * shell)
            n[f"{a}-{b}"] += np.cumsum(hist) / n_a
    nf = len(frames)
    return RDFResult(0.5 * (edges[1:] + edges[:-1]), edges, {p: v / nf for p, v in g.items()},
                     {p: v / nf for p, v in n.items()}, nf)


def adf(
    frames: Atoms | Iterable[Atoms],
    triplet: str | Sequence[str],
    cutoff: float,
    bins: int = 180,
) -> ADFResult:
    """Angular distribution of A-B-C: the angle at every B atom between an A
    neighbour and a C neighbour, both within ``cutoff`` of B.

    Each unordered pair of distinct neighbours counts once (for A = C, e.g.
    O-O-O, a B atom with k A neighbours gives k(k-1)/2 angles). Periodic
    images are distinct neighbours.

    Parameters
    ----------
    frames : ase.Atoms or iterable of ase.Atoms
        Periodic or not.
    triplet : str or sequence of str
        ``"A-B-C"``, e.g. ``"O-O-O"`` or ``"H-O-H"``; B is the vertex.
    cutoff : float
        Angstrom, > 0.
    bins : int
        Bins over 0-180 degrees.

    Returns
    -------
    ADFResult

    Raises
    ------
    ValueError
        No frames, a bad triplet or unknown element, ``cutoff <= 0``,
        ``bins < 1``, or no B atom in any frame.
    """
    frames = _frames(frames)
    a, b, c = parse_species(triplet, 3)
    if not cutoff > 0:
        raise ValueError(f"cutoff must be > 0 A, got {cutoff}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    za, zb, zc = atomic_numbers[a], atomic_numbers[b], atomic_numbers[c]
    edges = np.linspace(0.0, 180.0, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    centres = 0
    for atoms in frames:
        i, j, vec = neighbor_list("ijD", atoms, cutoff)
        numbers = atoms.numbers
        keep = np.flatnonzero(numbers[i] == zb)
        keep = keep[np.argsort(i[keep], kind="stable")]
        i, j, vec = i[keep], j[keep], vec[keep]
        unit = vec / np.linalg.norm(vec, axis=1)[:, None]
        starts = np.searchsorted(i, np.arange(len(atoms) + 1))
        centres += int(np.sum(numbers == zb))
        for centre in np.flatnonzero(numbers == zb):
            sl = slice(starts[centre], starts[centre + 1])
            species = numbers[j[sl]]
            ua, uc = unit[sl][species == za], unit[sl][species == zc]
            if a == c:
                p, q = np.triu_indices(len(ua), k=1)
                cosines = np.einsum("ij,ij->i", ua[p], ua[q])
            else:
                cosines = (ua @ uc.T).ravel()
            angles = np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))
            counts += np.histogram(angles, bins=edges)[0]
    if centres == 0:
        raise ValueError(f"no {b} atoms (the vertex of {a}-{b}-{c}) in any frame")
    total = counts.sum()
    width = edges[1] - edges[0]
    density = counts / (total * width) if total else np.zeros(bins)
    return ADFResult(0.5 * (edges[1:] + edges[:-1]), density, counts, (a, b, c), float(cutoff),
                     total / centres, len(frames))


def coordination(
    frames: Atoms | Iterable[Atoms],
    pair: str | Sequence[str],
    cutoff: float,
) -> CoordinationResult:
    """Histogram of the number of B atoms within ``cutoff`` of each A atom.

    The atom itself is not counted; its periodic images are (as in any
    periodic crystal).

    Parameters
    ----------
    frames : ase.Atoms or iterable of ase.Atoms
    pair : str or sequence of str
        ``"A-B"``, e.g. ``"Si-Si"`` or ``"O-H"``.
    cutoff : float
        Angstrom, > 0.

    Returns
    -------
    CoordinationResult

    Raises
    ------
    ValueError
        No frames, a bad pair or unknown element, ``cutoff <= 0``, or no A
        atom in any frame.
    """
    frames = _frames(frames)
    a, b = parse_species(pair, 2)
    if not cutoff > 0:
        raise ValueError(f"cutoff must be > 0 A, got {cutoff}")
    za, zb = atomic_numbers[a], atomic_numbers[b]
    per_atom = []
    for atoms in frames:
        i, j = neighbor_list("ij", atoms, cutoff)
        numbers = atoms.numbers
        cn = np.bincount(i[numbers[j] == zb], minlength=len(atoms))
        per_atom.append(cn[numbers == za])
    cn = np.concatenate(per_atom)
    if cn.size == 0:
        raise ValueError(f"no {a} atoms in any frame")
    counts = np.bincount(cn)
    return CoordinationResult(np.arange(len(counts)), counts, counts / counts.sum(), float(cn.mean()),
                              (a, b), float(cutoff), len(frames))


# --- helpers -----------------------------------------------------------------


def _frames(frames) -> list[Atoms]:
    frames = [frames] if isinstance(frames, Atoms) else list(frames)
    if not frames:
        raise ValueError("no frames given")
    return frames


def _half_width(atoms: Atoms) -> float:
    """Half the smallest distance between opposite faces of the cell, Angstrom."""
    cell = atoms.cell.array
    volume = abs(np.linalg.det(cell))
    widths = [volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)]
    return 0.5 * min(widths)


def _write_csv(path, header, columns) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in zip(*columns):
            writer.writerow([f"{v:.8g}" if isinstance(v, float | np.floating) else int(v) for v in row])
    return path
