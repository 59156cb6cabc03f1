"""The edge tensor product of an interaction block, as three matrix products.

The numbers are those of e3nn's ``o3.TensorProduct`` in ``uvu`` mode with
per-edge weights (``shared_weights=False``, ``internal_weights=False``,
component normalisation of the irreps, element normalisation of the paths),
and its weights have e3nn's layout, so model files written when the block
used e3nn's class load unchanged. e3nn builds the product path by path, each a slice, a Clebsch-Gordan
contraction and a product; here every path is in one contraction:

1. the neighbour's features with channels first (n_edges, mul, d_in),
   one copy per path of the input irrep it reads, times that path's
   per-edge weight of each channel: (n_edges, mul, Q), with ``Q`` the
   (path, input component) pairs;
2. ``B = Y @ C``: each edge's spherical harmonics ``Y`` (n_edges, sh_dim)
   contracted with all paths' Wigner 3j symbols at once, a matrix per edge
   (n_edges, Q, d_out) that also sums the paths of one output irrep;
3. one batched product of the two: (n_edges, mul, d_out).

Compiled, one block's product with forces and a double backward takes a
quarter to two thirds of e3nn's time (docs/benchmarks/README.md, levers 9
and 10).
"""

from __future__ import annotations

import math

import torch
from e3nn import o3


class EdgeTensorProduct(torch.nn.Module):
    """``out[e, u, :] = sum_p w[e, p, u] * c_p * CG_p(x[e, u, l1_p], Y[e, l2_p])`` (uvu mode).

    Parameters
    ----------
    irreps_in : node features, every irrep with the same multiplicity ``mul``.
    irreps_sh : spherical harmonics of the edge direction, multiplicity 1.
    irreps_out : output irreps, multiplicity ``mul``.
    paths : ``(i_in, i_sh, i_out)`` per path, indices into the three irreps;
        ``ir_out`` must be in ``ir_in * ir_sh``.

    Layouts: features with channels first, ``(n, mul, d)`` with ``d`` the sum
    of the irreps' dimensions (``to_channels`` / ``to_irreps`` convert from
    and to e3nn's ``(n, irreps.dim)``); weights ``(n_edges, weight_numel)``,
    path by path, ``mul`` each, as e3nn orders them.

    Examples
    --------
    >>> irreps = o3.Irreps("8x0e + 8x1o")
    >>> tp = EdgeTensorProduct(irreps, o3.Irreps("1x0e + 1x1o"), irreps, [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)])
    >>> x = tp.to_channels(torch.randn(5, irreps.dim))
    >>> tp(x, torch.randn(5, 4), torch.randn(5, tp.weight_numel)).shape
    torch.Size([5, 8, 4])
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_sh: o3.Irreps, irreps_out: o3.Irreps,
                 paths: list[tuple[int, int, int]]):
        super().__init__()
        self.mul = irreps_in[0].mul
        if any(m != self.mul for m, _ in irreps_in + irreps_out) or any(m != 1 for m, _ in irreps_sh):
            raise ValueError(f"one multiplicity for {irreps_in} and {irreps_out}, 1 for {irreps_sh}")
        self.irreps_in, self.irreps_out = irreps_in, irreps_out
        self.weight_numel = len(paths) * self.mul
        self.n_paths = len(paths)
        d_in, d_out, d_sh = _offsets(irreps_in), _offsets(irreps_out), _offsets(irreps_sh)
        n_q = sum(irreps_in[i].ir.dim for i, _, _ in paths)  # (path, input component) pairs
        cg = torch.zeros(irreps_sh.dim, n_q, d_out[-1], dtype=torch.float64)
        pick_x = torch.zeros(d_in[-1], n_q, dtype=torch.float64)
        pick_w = torch.zeros(len(paths), n_q, dtype=torch.float64)
        q = 0
        for p, (i, s, o) in enumerate(paths):
            l1, l2, lo = irreps_in[i].ir.l, irreps_sh[s].ir.l, irreps_out[o].ir.l
            if irreps_out[o].ir not in irreps_in[i].ir * irreps_sh[s].ir:
                raise ValueError(f"path {p}: {irreps_out[o].ir} is not in {irreps_in[i].ir} x {irreps_sh[s].ir}")
            w3j = o3.wigner_3j(l1, l2, lo, dtype=torch.float64) * _path_weight(paths, p, irreps_out)
            n = 2 * l1 + 1
            cg[d_sh[s]:d_sh[s + 1], q:q + n, d_out[o]:d_out[o + 1]] = w3j.permute(1, 0, 2)
            pick_x[d_in[i]:d_in[i + 1], q:q + n] = torch.eye(n, dtype=torch.float64)
            pick_w[p, q:q + n] = 1.0
            q += n
        dtype = torch.get_default_dtype()
        # constants of the product, not state: model files keep e3nn's keys (see _drop_e3nn_buffers)
        self.register_buffer("cg", cg.reshape(irreps_sh.dim, -1).to(dtype), persistent=False)
        self.register_buffer("pick_x", pick_x.to(dtype), persistent=False)
        self.register_buffer("pick_w", pick_w.to(dtype), persistent=False)
        self.n_q, self.d_out = n_q, d_out[-1]
        self._register_load_state_dict_pre_hook(_drop_e3nn_buffers)

    def forward(self, x: torch.Tensor, sh: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x`` (n_edges, mul, d_in), ``sh`` (n_edges, sh_dim), ``weights`` (n_edges, weight_numel)
        -> (n_edges, mul, d_out)."""
        n = x.shape[0]
        weighted = (x @ self.pick_x) * (weights.view(n, self.n_paths, self.mul).transpose(1, 2) @ self.pick_w)
        return torch.bmm(weighted, (sh @ self.cg).view(n, self.n_q, self.d_out))

    def to_channels(self, h: torch.Tensor) -> torch.Tensor:
        """e3nn's layout (n, irreps_in.dim) -> channels first (n, mul, d_in)."""
        blocks = h.split([self.mul * ir.dim for _, ir in self.irreps_in], dim=1)
        return torch.cat([b.reshape(h.shape[0], self.mul, ir.dim) for b, (_, ir) in zip(blocks, self.irreps_in)],
                         dim=2)

    def to_irreps(self, h: torch.Tensor) -> torch.Tensor:
        """Channels first (n, mul, d_out) -> e3nn's layout (n, irreps_out.dim)."""
        sizes = [ir.dim for _, ir in self.irreps_out]
        return torch.cat([block.reshape(h.shape[0], -1) for block in h.split(sizes, dim=2)], dim=1)


def _offsets(irreps: o3.Irreps) -> list[int]:
    """Where each irrep's components start in a channel of ``irreps``, and the total."""
    out = [0]
    for _, ir in irreps:
        out.append(out[-1] + ir.dim)
    return out


def _path_weight(paths: list[tuple[int, int, int]], p: int, irreps_out: o3.Irreps) -> float:
    """e3nn's normalisation: component (``sqrt(2 l_out + 1)``) over element (the paths into that output)."""
    into = sum(1 for _, _, o in paths if o == paths[p][2])
    return math.sqrt(irreps_out[paths[p][2]].ir.dim / into)


def _drop_e3nn_buffers(state_dict, prefix, *args):
    """Model files written with e3nn's ``TensorProduct`` hold its two buffers: an empty ``weight`` (the
    weights come per edge) and ``output_mask``, which follows from the irreps. Neither is needed here."""
    for name in ("weight", "output_mask"):
        state_dict.pop(prefix + name, None)
