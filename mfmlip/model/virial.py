"""Forces and virials from the edge vectors, with a per-atom split of the virial.

:meth:`mfmlip.model.interface.Potential.forward` gives the stress by a strain
derivative, which has no per-atom split. Here the energy is differentiated
with respect to the positions and to each edge's Cartesian periodic shift
``s_e = S_e @ cell``: a model sees an edge only as ``r_e = r_j - r_i + s_e``
(the edge contract of :mod:`mfmlip.data.graph`), so ``dE/ds_e = dE/dr_e``.
The virial is ``W = -sum_e r_e (x) dE/dr_e`` (eV; ``W = -V * stress`` with
the ASE-sign stress of a 3D-periodic cell, and ``sum_i r_i (x) F_i`` for a
molecule); each edge gives half of its term to each of its two atoms. The
cell itself is not differentiated, so it may be singular (a molecule's zero
cell) and need not be invertible.

Used by the LAMMPS driver (:mod:`mfmlip.lammps`, whose per-atom virials
``compute stress/atom`` reads) and by the exported model
(:mod:`mfmlip.model.export`).
"""

from __future__ import annotations

import torch

from mfmlip import keys as K


def energy_forces_virials(model, batch: dict) -> dict:
    """Energies, forces and virials of a batch, from one backward pass.

    Parameters
    ----------
    model : :class:`~mfmlip.model.interface.Potential` (any mode; derivatives
        are not kept for a second backward pass).
    batch : as :meth:`mfmlip.model.inference.Predictor.batch` makes it.

    Returns
    -------
    dict of tensors, detached, in the model's dtype: ``energy`` (n_graphs,)
    eV, ``atomic_energy`` (n_atoms,) eV, ``forces`` (n_atoms, 3) eV/Angstrom,
    ``virial`` (n_graphs, 3, 3) eV and ``atomic_virial`` (n_atoms, 3, 3) eV,
    both symmetric.
    """
    dtype = model.dtype
    centre, neighbour = batch[K.EDGE_INDEX]
    graph = batch[K.BATCH]
    cell = batch[K.CELL].to(dtype)
    positions = batch[K.POSITIONS].to(dtype).detach().requires_grad_(True)
    shifts = torch.einsum("ei,eij->ej", batch[K.SHIFTS].to(dtype), cell[graph[centre]]).detach().requires_grad_(True)
    eye = torch.eye(3, dtype=dtype, device=cell.device).expand_as(cell)  # shifts already Cartesian
    with torch.enable_grad():
        out = model.energy({**batch, K.POSITIONS: positions, K.SHIFTS: shifts, K.CELL: eye})
        d_positions, d_edges = torch.autograd.grad(out[K.ENERGY].sum(), [positions, shifts], allow_unused=True)
    if d_positions is None:  # no edges: the energy is a sum of E0s
        d_positions, d_edges = torch.zeros_like(positions), torch.zeros_like(shifts)
    edges = positions.detach()[neighbour] - positions.detach()[centre] + shifts.detach()
    terms = -edges[:, :, None] * d_edges[:, None, :]
    terms = (terms + terms.transpose(1, 2)) / 2
    atomic_virial = torch.zeros(len(positions), 3, 3, dtype=dtype, device=positions.device)
    atomic_virial = atomic_virial.index_add(0, centre, terms / 2).index_add(0, neighbour, terms / 2)
    virial = torch.zeros_like(cell).index_add(0, graph[centre], terms)
    return {K.ENERGY: out[K.ENERGY].detach(), K.ATOMIC_ENERGY: out[K.ATOMIC_ENERGY].detach(),
            K.FORCES: -d_positions, "virial": virial, "atomic_virial": atomic_virial}
