"""DIRECT and narrow picks of a run's high-level structures (Ko & Ong 2025
compared both with random picks; DIRECT: Qi et al., npj Comput. Mater. 10, 43
(2024)). The encoder is the study's low-level model of the run's seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mfmlip.model.serialization import load_model
from mfmlip.sampling import encode, principal_components, select
from mfmlip.study.plan import Run, write_split
from mfmlip.training.data import read_entry


def narrow_bounds(scores: np.ndarray, n: int, share: float) -> list[tuple]:
    """PC1 bound of the region of lowest PC1 scores that holds ``share`` of the
    candidates, or ``n`` of them if that is more."""
    ranked = np.sort(scores[:, 0])
    m = max(n, int(np.ceil(share * len(ranked))))
    return [(None, np.inf if m >= len(ranked) else 0.5 * (ranked[m - 1] + ranked[m]))]


def choose_high(run: Run, reader) -> None:
    """Write the run's high-level split file from its ``choose`` description
    (kept if it exists, so a resumed run keeps its pick)."""
    c = run.choose
    if Path(c["split"]).is_file():
        return
    fc, data = run.config.data.files[-1], run.config.data
    _, kept, _ = read_entry(fc, data, Path(data.root), reader)
    by_frame = {s.frame: s for s in kept}
    pool = np.array(c["pool"])
    vectors = encode([by_frame[i] for i in pool], load_model(c["encoder"]), fidelity=c["fidelity"])
    if c["selection"] == "narrow":
        pca = principal_components(vectors)
        bounds = narrow_bounds(pca.scores, c["n"], c["narrow_share"])
        picked = select(vectors, c["n"], "narrow", seed=c["seed"], bounds=bounds, pca=pca)
    else:
        picked = select(vectors, c["n"], "direct", seed=c["seed"], **c["direct"])
    chosen = np.random.default_rng(c["seed"]).permutation(pool[picked])
    write_split(Path(c["split"]), train=chosen[c["n_val"]:], val=chosen[: c["n_val"]], test=c["test"])
