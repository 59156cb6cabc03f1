"""Equivariant interaction block (NequIP/SevenNet family) and the energy readout."""

from __future__ import annotations

import torch
from e3nn import nn as e3nn_nn
from e3nn import o3

from mfmlip.model.tensor_product import EdgeTensorProduct


def hidden_irreps(channels: int, lmax: int) -> o3.Irreps:
    """``channels`` copies of each ``l <= lmax`` with parity ``(-1)^l``: 0e + 1o + 2e + ..."""
    return o3.Irreps([(channels, (l, (-1) ** l)) for l in range(lmax + 1)])


def _gate(target: o3.Irreps) -> e3nn_nn.Gate:
    """Gated nonlinearity (Weiler et al. 2018): SiLU on scalars, sigmoid gates on l > 0."""
    scalars = o3.Irreps([(m, ir) for m, ir in target if ir.l == 0])
    gated = o3.Irreps([(m, ir) for m, ir in target if ir.l > 0])
    gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
    acts = [torch.nn.functional.silu if ir.p == 1 else torch.tanh for _, ir in scalars]
    return e3nn_nn.Gate(scalars, acts, gates, [torch.sigmoid] * len(gates), gated)


class Interaction(torch.nn.Module):
    """One message-passing block.

    ``h' = SelfConnection(h) + Gate(LinearPost(sum_j TP(LinearPre(h)_j, Y(r_ij); R(|r_ij|)) / sqrt(avg_num_neighbors)))``

    with ``Y`` the spherical harmonics, ``R`` a radial MLP giving the tensor
    product weights per edge (Batzner et al., NequIP, Nat. Commun. 2022). The
    block does not know the fidelity: the potential hands it the fidelity
    features ``pre`` and ``post`` (``extra_pre``/``extra_post`` columns, or
    None), appended to the scalar inputs of ``LinearPre`` and ``LinearPost``. Paths of the tensor
    product that give the same output irrep sum into one slot, each with its
    own radial weights; the product is :class:`~mfmlip.model.tensor_product.EdgeTensorProduct`
    (e3nn's numbers, in three matrix products). Dividing by ``sqrt`` rather than the neighbour count
    keeps messages of random sign at unit scale, as NequIP does; it halved
    the force error of a short NaCl-water run (docs/benchmarks/report.md).

    Inputs: ``h`` (n_atoms, irreps_in.dim), ``sh`` (n_edges, irreps_sh.dim),
    ``radial`` (n_edges, num_radial), ``edge_index`` (2, n_edges), ``pre``
    (n_atoms, extra_pre) and ``post`` (n_atoms, extra_post) or None. Output:
    (n_atoms, irreps_out.dim).
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_target: o3.Irreps,
        irreps_sh: o3.Irreps,
        num_radial: int,
        radial_hidden: int,
        avg_num_neighbors: float,
        extra_pre: int = 0,
        extra_post: int = 0,
    ):
        super().__init__()
        # a buffer, not a float: a float would be a constant of the compiled graph, so every data set's
        # neighbour count would miss Inductor's cache and compile anew (docs/benchmarks/compile.md)
        self.register_buffer("message_norm", torch.tensor(float(avg_num_neighbors) ** -0.5, dtype=torch.float64),
                             persistent=False)
        self.linear_pre = o3.Linear(irreps_in + o3.Irreps(f"{extra_pre}x0e"), irreps_in)
        # paths with the same output irrep share one slot: a 4x narrower message (benchmarks/)
        outs = [ir for _, ir in irreps_target]
        paths = [(i_in, i_sh, outs.index(ir_out))
                 for i_in, (_, ir_in) in enumerate(irreps_in) for i_sh, (_, ir_sh) in enumerate(irreps_sh)
                 for ir_out in ir_in * ir_sh if ir_out in outs]
        used = sorted({o for _, _, o in paths})
        mid = o3.Irreps([(irreps_in[0].mul, outs[o]) for o in used])
        self.tp = EdgeTensorProduct(irreps_in, irreps_sh, mid, [(i, s, used.index(o)) for i, s, o in paths])
        self.radial_mlp = e3nn_nn.FullyConnectedNet(
            [num_radial, radial_hidden, radial_hidden, self.tp.weight_numel], torch.nn.functional.silu
        )
        self.gate = _gate(irreps_target)
        self.linear_post = o3.Linear(mid + o3.Irreps(f"{extra_post}x0e"), self.gate.irreps_in)
        self.self_connection = o3.Linear(irreps_in, self.gate.irreps_out)
        self.irreps_out = self.gate.irreps_out

    def forward(self, h, sh, radial, edge_index, pre=None, post=None):
        centre, neighbour = edge_index
        x = self.tp.to_channels(self.linear_pre(append(h, pre)))
        messages = self.tp(x[neighbour], sh, self.radial_mlp(radial))
        agg = torch.zeros((h.shape[0], *messages.shape[1:]), dtype=h.dtype, device=h.device)
        agg = self.tp.to_irreps(agg.index_add(0, centre, messages)) * self.message_norm
        out = self.gate(self.linear_post(append(agg, post)))
        return self.self_connection(h) + out


def append(h: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """``h`` (n_atoms, d) with the scalar columns ``extra`` (n_atoms, k) appended, if any."""
    return h if extra is None else torch.cat([h, extra.to(h.dtype)], dim=-1)


class Readout(torch.nn.Module):
    """Atomic energies from invariant features: Linear -> SiLU -> Linear.

    Input (n_atoms, channels + extra); output (n_atoms, n_heads), unscaled.
    """

    def __init__(self, dim_in: int, hidden: int, n_heads: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim_in, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, n_heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
