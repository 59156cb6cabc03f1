"""Choosing which structures to label at the high level.

``encode`` turns structures into fixed-length vectors (by default the pooled
invariant node features of a trained mfmlip model); ``select`` picks candidate
indices from such vectors with DIRECT sampling (Qi et al., npj Comput. Mater.
10, 43 (2024)), at random, or from a "narrow" box in PC space (the baselines of
Ko & Ong 2025). The selectors are pure numpy functions.

>>> from mfmlip.sampling import encode, select
>>> vectors = encode(candidates, "runs/malonaldehyde/model.pt")   # doctest: +SKIP
>>> picked = select(vectors, 100, method="direct", seed=0)        # doctest: +SKIP
"""

from mfmlip.sampling.select import (
    METHODS, PICKS, POOLINGS, PCA, Selection, birch_clusters, direct_counts, direct_select, format_region, narrow_select,
    parse_region, pick_from_clusters, principal_components, random_select, sample, select,
)

__all__ = [
    "encode", "pool", "plot_selection", "METHODS", "PICKS", "POOLINGS", "PCA", "Selection",
    "birch_clusters", "direct_counts", "direct_select", "format_region", "narrow_select", "parse_region",
    "pick_from_clusters", "principal_components", "random_select", "sample", "select",
]

#: imported on first use: they need torch (encode, pool) and matplotlib (plot_selection),
#: which the selectors and the command line's start-up do not
_LAZY = {"encode": "mfmlip.sampling.encoding", "pool": "mfmlip.sampling.encoding",
         "plot_selection": "mfmlip.sampling.plot"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mfmlip.sampling' has no attribute {name!r}")
