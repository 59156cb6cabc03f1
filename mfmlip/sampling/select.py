"""Choose a subset of candidate structures from their feature vectors.

Pure functions: a ``(n_candidates, dim)`` array in, candidate indices out. Nothing
here knows about atoms or models, so the same selectors serve ``mfmlip sample``
(vectors from :func:`mfmlip.sampling.encode`) and any other pool of vectors.

Methods (by name in :func:`select` / :func:`sample`)
----------------------------------------------------
``direct`` (:func:`direct_select`)
    DIRECT sampling (Qi et al., npj Comput. Mater. 10, 43 (2024); used by Ko &
    Ong 2025): standardise the features, project on the leading principal
    components (Kaiser's rule by default), cluster with BIRCH and take ``k``
    structures from each cluster.
``random`` (:func:`random_select`)
    ``n`` candidates uniformly without replacement.
``narrow`` (:func:`narrow_select`)
    ``n`` candidates at random from a box in principal-component space (Ko &
    Ong's "narrow" baseline: e.g. PC1 < -12.5 and PC2 < -2.5).

All randomness comes from ``numpy.random.default_rng(seed)``: the same inputs
and seed give the same indices.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

METHODS = ("direct", "random", "narrow")
PICKS = ("center", "random")
POOLINGS = ("mean", "species")  # how mfmlip.sampling.encode averages node features

# subclusters that the BIRCH tree should hold before the global (agglomerative)
# step: enough to resolve n clusters well, few enough for the O(m^2) ward step
_MAX_SUBCLUSTERS = 4000


@dataclass
class PCA:
    """Principal components of standardised vectors.

    Attributes
    ----------
    scores : (n_candidates, n_all) float, projections on every component
        (unweighted; the coordinates of the PC plot and of ``narrow`` bounds).
    eigenvalues : (n_all,) float, eigenvalues of the features' correlation
        matrix, descending (they sum to the number of non-constant features).
    explained_ratio : (n_all,) float, fraction of the variance per component.
    n_components : int, components kept for clustering.
    """

    scores: np.ndarray
    eigenvalues: np.ndarray
    explained_ratio: np.ndarray
    n_components: int

    def reduced(self, weighted: bool = True) -> np.ndarray:
        """(n_candidates, n_components) kept scores; with ``weighted``, each
        multiplied by its explained-variance ratio (as DIRECT does), so that
        the leading components dominate the clustering distances."""
        kept = self.scores[:, : self.n_components]
        return kept * self.explained_ratio[: self.n_components] if weighted else kept


@dataclass
class Selection:
    """Result of a selector.

    Attributes
    ----------
    indices : (n_selected,) int, candidate indices, ascending.
    method : ``"direct"``, ``"random"`` or ``"narrow"``.
    pca : :class:`PCA` of the candidates (None for ``random``).
    labels : (n_candidates,) int cluster of each candidate, ``0..n_clusters-1``
        (``direct`` only, else None).
    info : parameters actually used (n_clusters, k, threshold, bounds...).
    """

    indices: np.ndarray
    method: str
    pca: PCA | None = None
    labels: np.ndarray | None = None
    info: dict = field(default_factory=dict)


# -- building blocks ------------------------------------------------------------


def _as_matrix(vectors) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty (n_candidates, dim) array, got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(f"vectors of candidates {bad[:10].tolist()} contain NaN or inf")
    return x


def _check_n(n, total: int) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= total:
        raise ValueError(f"n={n!r}: choose an integer 1..{total} (the number of candidates)")


def principal_components(vectors, n_components: int | str = "kaiser") -> PCA:
    """Standardise each feature (zero mean, unit variance) and run PCA.

    Parameters
    ----------
    vectors : (n_candidates, dim) array.
    n_components : ``"kaiser"`` keeps the components whose correlation-matrix
        eigenvalue exceeds 1 (Kaiser's rule; at least one), an int keeps that many.

    Raises
    ------
    ValueError
        Non-finite vectors, fewer than 2 candidates, no feature that varies, or
        more components requested than there are.
    """
    from sklearn.decomposition import PCA as SkPCA
    from sklearn.preprocessing import StandardScaler

    x = _as_matrix(vectors)
    n, dim = x.shape
    if n < 2:
        raise ValueError("PCA needs at least 2 candidates")
    z = StandardScaler().fit_transform(x)  # constant features become 0
    if not np.any(z):
        raise ValueError("no feature varies across the candidates: nothing to analyse")
    pca = SkPCA(svd_solver="full").fit(z)
    # sklearn divides by n-1, StandardScaler by n: rescale to correlation-matrix eigenvalues
    eigenvalues = pca.explained_variance_ * (n - 1) / n
    if n_components == "kaiser":
        kept = max(1, int(np.sum(eigenvalues > 1.0)))
    elif isinstance(n_components, (int, np.integer)) and not isinstance(n_components, bool):
        if not 1 <= n_components <= len(eigenvalues):
            raise ValueError(f"n_components={n_components}: choose 1..{len(eigenvalues)} "
                             f"({n} candidates, {dim} features)")
        kept = int(n_components)
    else:
        raise ValueError(f"n_components must be 'kaiser' or an int, got {n_components!r}")
    return PCA(pca.transform(z), eigenvalues, pca.explained_variance_ratio_, kept)


def birch_clusters(points, n_clusters: int, threshold: float | None = None,
                   branching_factor: int = 50) -> tuple[np.ndarray, float]:
    """Cluster points into ``n_clusters`` with BIRCH (Zhang et al. 1996, scikit-learn).

    BIRCH first summarises the points in a tree of subclusters of radius at most
    ``threshold``, then merges the subclusters (agglomerative, Ward) into
    ``n_clusters``. With ``threshold=None`` it is searched so that the tree holds
    about 4 to 16 subclusters per cluster (fewer when ``n_clusters`` is large: the
    Ward step costs O(subclusters^2) memory).

    Parameters
    ----------
    points : (n_points, dim) array, e.g. :meth:`PCA.reduced`.
    n_clusters : clusters wanted, ``1 <= n_clusters <= n_points``.
    threshold : subcluster radius, in the units of ``points``.

    Returns
    -------
    labels : (n_points,) int in ``0..n_found-1``; ``n_found`` is ``n_clusters``
        unless a cluster ended up empty when points were reassigned to their
        nearest subcluster (rare).
    threshold : the threshold used.

    Raises
    ------
    ValueError
        ``n_clusters`` out of range, a ``threshold`` that gives fewer subclusters
        than ``n_clusters``, or fewer distinct points than ``n_clusters``.
    """
    from sklearn.cluster import Birch

    x = _as_matrix(points)
    n = len(x)
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters={n_clusters}: choose 1..{n} (the number of candidates)")

    def tree(t: float):
        return Birch(threshold=t, n_clusters=None, branching_factor=branching_factor,
                     compute_labels=False).fit(x)

    if threshold is not None:
        model = tree(float(threshold))
        found = len(model.subcluster_centers_)
        if found < n_clusters:
            raise ValueError(f"BIRCH threshold {threshold} gives only {found} subclusters, fewer than "
                             f"n_clusters={n_clusters}: lower the threshold or leave it to the search")
    else:
        threshold, model = _search_threshold(x, n_clusters, tree)
    model.set_params(n_clusters=n_clusters)
    model.partial_fit()  # global step only: merge the subclusters
    labels = model.predict(x)
    _, labels = np.unique(labels, return_inverse=True)  # compact 0..n_found-1
    return labels.astype(np.int64), float(threshold)


def _search_threshold(x: np.ndarray, n_clusters: int, tree):
    """Bisect log(threshold) until the BIRCH tree holds a workable number of subclusters.

    Aims at ``[low, high]`` subclusters, ``low = max(n_clusters, min(4 n_clusters,
    4000))`` (or all distinct points, if fewer); falls back to the closest
    threshold that gives at least ``n_clusters``.
    """
    n_distinct = len(np.unique(x, axis=0))
    if n_distinct < n_clusters:
        raise ValueError(f"only {n_distinct} distinct candidates, fewer than n_clusters={n_clusters}")
    low = min(max(n_clusters, min(4 * n_clusters, _MAX_SUBCLUSTERS)), n_distinct)
    high = max(2 * low, min(4 * low, _MAX_SUBCLUSTERS))
    spread = float(np.sqrt(((x - x.mean(axis=0)) ** 2).sum(axis=1).mean()))
    coarse = fine = None  # thresholds known to give too few / too many subclusters
    best = None  # (found, t, model) with found >= n_clusters, closest to the window
    t = spread
    for _ in range(40):
        model = tree(t)
        found = len(model.subcluster_centers_)
        if low <= found <= high:
            return t, model
        if found >= n_clusters and (best is None or abs(found - low) < abs(best[0] - low)):
            best = (found, t, model)
        if found < low:
            coarse = t
            t = math.sqrt(t * fine) if fine is not None else t / 2
        else:
            fine = t
            t = math.sqrt(t * coarse) if coarse is not None else t * 2
        if t < spread * 1e-12:
            break
    if best is None:
        raise ValueError(f"BIRCH found fewer than {n_clusters} subclusters at any threshold")
    return best[1], best[2]


def pick_from_clusters(points, labels, k: int | None = 1, n: int | None = None, pick: str = "center",
                       seed: int | None = 0) -> np.ndarray:
    """Take structures cluster by cluster.

    Within each cluster the members are ranked, by distance to the cluster's
    centroid (mean of its points) with ``pick="center"`` or in random order with
    ``pick="random"``. Round ``r`` takes the member of rank ``r`` from every
    cluster that has one, larger clusters first.

    Parameters
    ----------
    points : (n_points, dim) array the centroids and distances are computed in.
    labels : (n_points,) int cluster of each point.
    k : rounds: at most ``k`` per cluster (all members of smaller clusters).
    n : total wanted; if given, rounds continue (past ``k`` if needed, to make
        up for clusters smaller than ``k``) and stop at exactly ``n``.
    pick : ``"center"`` or ``"random"``.
    seed : random generator seed for ``pick="random"``.

    Returns
    -------
    (n_selected,) int indices, ascending.
    """
    x = _as_matrix(points)
    labels = np.asarray(labels)
    if labels.shape != (len(x),):
        raise ValueError(f"labels must have shape ({len(x)},), got {labels.shape}")
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
    if k is None and n is None:
        raise ValueError("give k (per cluster), n (in total) or both")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n is not None:
        _check_n(n, len(x))
    clusters, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    rng = np.random.default_rng(seed)
    rank = np.empty(len(x), dtype=np.int64)
    for c in range(len(clusters)):
        members = np.flatnonzero(inverse == c)
        if pick == "center":
            dist = np.linalg.norm(x[members] - x[members].mean(axis=0), axis=1)
            order = members[np.argsort(dist, kind="stable")]
        else:
            order = rng.permutation(members)
        rank[order] = np.arange(len(members))
    # by round, then larger cluster first, then cluster label, then index
    priority = np.lexsort((np.arange(len(x)), inverse, -sizes[inverse], rank))
    if n is None:
        chosen = priority[rank[priority] < k]
    else:
        chosen = priority[:n]
    return np.sort(chosen)


def direct_counts(n: int | None, n_clusters: int | None, k: int | None) -> tuple[int, int]:
    """The ``(n_clusters, k)`` DIRECT uses for a requested total ``n``.

    ``n`` alone: ``n`` clusters, 1 each. ``n`` and ``k``: ``ceil(n / k)``
    clusters. ``n`` and ``n_clusters``: ``k = ceil(n / n_clusters)``. Without
    ``n``, both ``n_clusters`` and ``k`` (default 1) are used as given.
    """
    for name, value in (("n", n), ("n_clusters", n_clusters), ("k", k)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if n is None:
        if n_clusters is None:
            raise ValueError("DIRECT needs n (total) or n_clusters (with k per cluster)")
        return int(n_clusters), int(k or 1)
    if n_clusters is None:
        k = k or 1
        return math.ceil(n / k), int(k)
    if k is None:
        return int(n_clusters), math.ceil(n / n_clusters)
    if n_clusters * k < n:
        raise ValueError(f"n_clusters={n_clusters} x k={k} < n={n}")
    return int(n_clusters), int(k)


# -- selectors --------------------------------------------------------------


def direct_select(vectors, n: int | None = None, *, n_clusters: int | None = None, k: int | None = None,
                  n_components: int | str = "kaiser", weight_pcs: bool = True, pick: str = "center",
                  threshold: float | None = None, seed: int | None = 0) -> Selection:
    """DIRECT sampling: standardise, PCA, BIRCH into ``n_clusters``, ``k`` per cluster.

    Parameters
    ----------
    vectors : (n_candidates, dim) array, one row per candidate.
    n : total to select; with it the result has exactly ``n`` indices (clusters
        smaller than ``k`` are made up for from the largest clusters).
    n_clusters, k : see :func:`direct_counts`.
    n_components : ``"kaiser"`` or an int, see :func:`principal_components`.
    weight_pcs : weight each kept PC by its explained-variance ratio before clustering.
    pick : ``"center"`` (closest to each cluster's centroid first) or ``"random"``.
    threshold : BIRCH subcluster radius in weighted-PC units; searched if None.
    seed : seed of ``pick="random"`` (clustering itself is deterministic).
    """
    x = _as_matrix(vectors)
    n_clusters, k = direct_counts(n, n_clusters, k)
    if n is not None:
        _check_n(n, len(x))
    pca = principal_components(x, n_components)
    points = pca.reduced(weight_pcs)
    labels, used = birch_clusters(points, n_clusters, threshold)
    indices = pick_from_clusters(points, labels, k=k, n=n, pick=pick, seed=seed)
    info = dict(n_clusters=int(labels.max()) + 1, n_clusters_requested=n_clusters, k=k,
                n_components=pca.n_components, weight_pcs=weight_pcs, pick=pick, threshold=used)
    return Selection(indices, "direct", pca, labels, info)


def random_select(vectors, n: int, *, seed: int | None = 0) -> Selection:
    """``n`` candidates uniformly at random, without replacement.

    ``vectors`` may be the (n_candidates, dim) array or just the number of candidates.
    """
    total = int(vectors) if np.isscalar(vectors) else len(vectors)
    _check_n(n, total)
    rng = np.random.default_rng(seed)
    return Selection(np.sort(rng.choice(total, size=n, replace=False)), "random", info=dict(seed=seed))


def narrow_select(vectors, n: int, *, bounds, seed: int | None = 0, pca: PCA | None = None) -> Selection:
    """``n`` candidates at random from a box in (unweighted) principal-component space.

    Parameters
    ----------
    bounds : sequence of ``(low, high)`` for PC1, PC2, ...; ``None`` for an open
        side. ``[(None, -12.5), (None, -2.5)]`` is ``PC1 < -12.5 and PC2 < -2.5``.
        A string such as ``"PC1<-12.5,PC2<-2.5"`` is parsed by :func:`parse_region`.
    pca : reuse a :func:`principal_components` of the same vectors.

    Raises
    ------
    ValueError
        Fewer than ``n`` candidates in the box (the message gives how many).
    """
    x = _as_matrix(vectors)
    if isinstance(bounds, str):
        bounds = parse_region(bounds)
    bounds = [(None if lo is None else float(lo), None if hi is None else float(hi)) for lo, hi in bounds]
    if not bounds:
        raise ValueError("narrow needs bounds on at least one principal component")
    pca = pca if pca is not None else principal_components(x)
    if len(bounds) > pca.scores.shape[1]:
        raise ValueError(f"bounds on {len(bounds)} PCs but there are only {pca.scores.shape[1]}")
    inside = np.ones(len(x), dtype=bool)
    for j, (lo, hi) in enumerate(bounds):
        if lo is not None:
            inside &= pca.scores[:, j] > lo
        if hi is not None:
            inside &= pca.scores[:, j] < hi
    pool = np.flatnonzero(inside)
    _check_n(n, len(x))
    if n > len(pool):
        raise ValueError(f"narrow region {format_region(bounds)} holds {len(pool)} of {len(x)} candidates, "
                         f"cannot select n={n}")
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(pool, size=n, replace=False))
    return Selection(indices, "narrow", pca, info=dict(bounds=bounds, n_inside=len(pool), seed=seed))


def sample(vectors, n: int | None, method: str = "direct", seed: int | None = 0, **options) -> Selection:
    """Run one selector by name; ``options`` go to :func:`direct_select` or :func:`narrow_select`."""
    if method == "direct":
        return direct_select(vectors, n, seed=seed, **options)
    if method == "random":
        if options:
            raise ValueError(f"method 'random' takes no options, got {sorted(options)}")
        return random_select(vectors, n, seed=seed)
    if method == "narrow":
        return narrow_select(vectors, n, seed=seed, **options)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def select(vectors, n: int | None, method: str = "direct", seed: int | None = 0, **options) -> np.ndarray:
    """Indices (ascending) of the candidates chosen by ``method``.

    Parameters
    ----------
    vectors : (n_candidates, dim) array, e.g. from :func:`mfmlip.sampling.encode`.
    n : number to select (``direct`` also accepts ``n=None`` with ``n_clusters`` and ``k``).
    method : ``"direct"``, ``"random"`` or ``"narrow"``.
    seed : seed of every random choice.
    **options : ``direct``: n_clusters, k, n_components, weight_pcs, pick,
        threshold; ``narrow``: bounds (required).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(200, 5))
    >>> select(x, 10, method="random", seed=1).shape
    (10,)
    """
    return sample(vectors, n, method, seed, **options).indices


# -- regions as text ----------------------------------------------------------

_CONDITION = re.compile(r"^\s*PC(\d+)\s*([<>])\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$", re.IGNORECASE)


def parse_region(text: str) -> list[tuple[float | None, float | None]]:
    """``"PC1<-12.5,PC2<-2.5"`` -> ``[(None, -12.5), (None, -2.5)]``.

    Conditions are ``PCi<value`` or ``PCi>value``, joined by commas (all must
    hold); PCs without a condition are unbounded.

    Raises
    ------
    ValueError
        A condition that does not parse, or a PC numbered below 1.
    """
    bounds: dict[int, list] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        m = _CONDITION.match(part)
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"cannot read region condition {part.strip()!r}; write e.g. 'PC1<-12.5,PC2>0'")
        pc, op, value = int(m.group(1)), m.group(2), float(m.group(3))
        lo_hi = bounds.setdefault(pc, [None, None])
        if op == "<":
            lo_hi[1] = value if lo_hi[1] is None else min(lo_hi[1], value)
        else:
            lo_hi[0] = value if lo_hi[0] is None else max(lo_hi[0], value)
    if not bounds:
        raise ValueError(f"empty region {text!r}; write e.g. 'PC1<-12.5,PC2>0'")
    return [tuple(bounds.get(pc, (None, None))) for pc in range(1, max(bounds) + 1)]


def format_region(bounds) -> str:
    """Inverse of :func:`parse_region` (for messages and plot titles)."""
    parts = []
    for j, (lo, hi) in enumerate(bounds, start=1):
        if lo is not None:
            parts.append(f"PC{j}>{lo:g}")
        if hi is not None:
            parts.append(f"PC{j}<{hi:g}")
    return ",".join(parts) or "(everything)"
