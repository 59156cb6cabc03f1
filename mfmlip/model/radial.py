"""Radial basis of edge lengths: Bessel functions times a smooth cutoff envelope."""

from __future__ import annotations

import torch
from e3nn.math import soft_one_hot_linspace


def polynomial_envelope(r: torch.Tensor, cutoff: float, p: int = 6) -> torch.Tensor:
    """Smooth cutoff of Gasteiger et al. (DimeNet, ICLR 2020, Eq. 8).

    Equals 1 at r = 0 and goes to 0 at ``r = cutoff`` with ``p`` continuous
    derivatives. ``r`` has any shape; returns the same shape.
    """
    x = (r / cutoff).clamp(max=1.0)
    env = (
        1.0
        - (p + 1) * (p + 2) / 2 * x**p
        + p * (p + 2) * x ** (p + 1)
        - p * (p + 1) / 2 * x ** (p + 2)
    )
    return env * (x < 1.0)


class RadialBasis(torch.nn.Module):
    """Bessel basis ``sqrt(2/c) sin(n pi r / c) / r`` (n = 1..num_basis) times the envelope.

    Input ``r``: (n_edges,) Angstrom. Output: (n_edges, num_basis).
    """

    def __init__(self, cutoff: float, num_basis: int = 8, envelope_p: int = 6):
        super().__init__()
        self.cutoff, self.num_basis, self.envelope_p = float(cutoff), int(num_basis), int(envelope_p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        basis = soft_one_hot_linspace(r, 0.0, self.cutoff, self.num_basis, basis="bessel", cutoff=True)
        return basis * polynomial_envelope(r, self.cutoff, self.envelope_p).unsqueeze(-1)
