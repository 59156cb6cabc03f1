"""The one potential interface: an energy model, with forces and stress from one wrapper.

A potential implements :meth:`Potential.energy` (batch -> energies) and
inherits :meth:`Potential.forward`, which differentiates that energy:
``forces = -dE/dr`` and ``stress = (1/V) dE/d(strain)`` (ASE sign), as in
NequIP's ``ForceStressOutput`` (Batzner et al., Nat. Commun. 2022) and the
strain trick of Knuth et al., Comput. Phys. Commun. 190, 33 (2015).
:func:`validate_potential` checks that a potential keeps the contract, as
torch-sim's ``validate_model_outputs`` does for its models.

Units: eV, Angstrom, eV/Angstrom, eV/Angstrom^3.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from ase.data import chemical_symbols

from mfmlip import keys as K


def fidelity_index(fidelities: list[str], name: str | None) -> int:
    """Position of ``name`` in a model's ``fidelities``: the one name -> index
    conversion of mfmlip.

    Raises
    ------
    ValueError
        A missing or unknown fidelity; the message lists the model's ones.

    Examples
    --------
    >>> fidelity_index(["PBE", "MP2"], "MP2")
    1
    """
    if name is None:
        raise ValueError(f"fidelity is required; this model has {list(fidelities)}")
    if name not in fidelities:
        raise ValueError(f"unknown fidelity {name!r}; this model has {list(fidelities)}")
    return list(fidelities).index(name)


def structure_energies(atomic: torch.Tensor, graph_of_atom: torch.Tensor, n_graphs: int) -> torch.Tensor:
    """Per-structure energies ``(n_graphs,)`` eV: the sum of ``atomic`` ``(n_atoms,)`` eV over the
    atoms of each structure (``graph_of_atom`` ``(n_atoms,)``). One structure is a plain sum:
    Inductor's scatter into a buffer of size 1 fails on 2 threads (docs/benchmarks/README.md)."""
    if n_graphs == 1:
        return atomic.sum(0, keepdim=True)
    return torch.zeros(n_graphs, dtype=atomic.dtype, device=atomic.device).index_add(0, graph_of_atom, atomic)


class Potential(torch.nn.Module):
    """Base class of every mfmlip potential (:class:`~mfmlip.model.MFPotential`,
    :class:`~mfmlip.model.DeltaPotential`, :class:`~mfmlip.model.SevenNetPotential`).

    Parameters
    ----------
    species : atomic numbers the potential knows.
    fidelities : fidelity names; ``batch["fidelity"]`` indexes this list.
    cutoff : neighbour cutoff, Angstrom.

    Notes
    -----
    Subclasses implement ``energy(batch)``: read ``positions`` (n_atoms, 3) and
    ``cell`` (n_graphs, 3, 3) from ``batch`` (they may carry a strain and
    require grad) and return ``{"energy": (n_graphs,), "atomic_energy":
    (n_atoms,), "node_features": (n_atoms, dim)}`` in eV; and the ``dtype``
    property. The E0 table is ``e0_table()``, (n_fidelities, n_species) eV.
    """

    #: :meth:`species_index` refuses unknown elements (off only while tracing for export)
    check_species = True

    def __init__(self, species: list[int], fidelities: list[str], cutoff: float):
        super().__init__()
        self.species, self.fidelities, self.cutoff = [int(z) for z in species], list(fidelities), float(cutoff)
        z_to_species = torch.full((119,), -1, dtype=torch.long)
        z_to_species[torch.tensor(self.species)] = torch.arange(len(self.species))
        self.register_buffer("z_to_species", z_to_species)

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def energy(self, batch: dict) -> dict:
        raise NotImplementedError

    def species_index(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        """(n_atoms,) atomic numbers -> species indices.

        Raises
        ------
        ValueError
            An element the model was not trained on.
        """
        idx = self.z_to_species[atomic_numbers]
        if not self.check_species:  # a traced graph (mfmlip.model.export) has no data-dependent branch
            return idx
        if (idx < 0).any():
            bad = sorted({chemical_symbols[int(z)] for z in atomic_numbers[idx < 0]})
            known = [chemical_symbols[z] for z in self.species]
            raise ValueError(f"element(s) {bad} unknown to this model; it knows {known}")
        return idx

    def fidelity_index(self, name: str | None) -> int:
        """Index of a fidelity name in ``self.fidelities`` (:func:`fidelity_index`)."""
        return fidelity_index(self.fidelities, name)

    def forward(self, batch: dict, compute_forces: bool = True, compute_stress: bool = False) -> dict:
        """The outputs of :meth:`energy`, plus forces (n_atoms, 3) eV/Angstrom if
        ``compute_forces`` and stress (n_graphs, 3, 3) eV/Angstrom^3 if
        ``compute_stress`` (zero for structures that are not 3D-periodic).

        Floating inputs are cast to the model's dtype. Derivatives keep their
        graph (for the force loss) when the module is in training mode.
        """
        dtype = self.dtype
        positions, cell = batch[K.POSITIONS].to(dtype), batch[K.CELL].to(dtype)
        # derivatives need a graph even under no_grad; otherwise the caller's grad mode holds
        with torch.enable_grad() if compute_forces or compute_stress else contextlib.nullcontext():
            inputs = []
            if compute_forces:
                positions = positions.detach().requires_grad_(True)
                inputs.append(positions)
            strained_positions, strained_cell = positions, cell
            if compute_stress:
                strain = torch.zeros_like(cell, requires_grad=True)
                inputs.append(strain)
                sym = 0.5 * (strain + strain.transpose(1, 2))
                strained_positions = positions + torch.einsum("ai,aij->aj", positions, sym[batch[K.BATCH]])
                strained_cell = cell + torch.bmm(cell, sym)
            out = self.energy({**batch, K.POSITIONS: strained_positions, K.CELL: strained_cell})
            if inputs:
                grads = torch.autograd.grad(
                    out[K.ENERGY].sum(), inputs, create_graph=self.training, allow_unused=True
                )
                grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
        if compute_forces:
            out[K.FORCES] = -grads[0]
        if compute_stress:
            volume = torch.linalg.det(cell).abs()
            periodic = batch[K.PBC].all(dim=1) & (volume > 0)
            out[K.STRESS] = torch.where(
                periodic[:, None, None], grads[-1] / volume.clamp(min=1e-12)[:, None, None], 0.0
            )
        return out


def validate_potential(model: Potential, batch: dict, atol: float = 1e-6) -> None:
    """Check that ``model`` keeps the potential contract on ``batch`` (float64 advised).

    Checks: output keys, shapes and dtypes; ``energy`` equals the sum of
    ``atomic_energy`` per structure; forces equal a central finite difference
    of the energy for one coordinate; stress is zero for a structure that is
    not 3D-periodic; ``fidelity_index`` refuses a missing and an unknown name.

    Raises
    ------
    AssertionError
        The first broken rule, named.
    """
    n_atoms, n_graphs = batch[K.POSITIONS].shape[0], batch[K.N_ATOMS].shape[0]
    out = model(batch, compute_forces=True, compute_stress=True)
    shapes = {K.ENERGY: (n_graphs,), K.ATOMIC_ENERGY: (n_atoms,), K.FORCES: (n_atoms, 3), K.STRESS: (n_graphs, 3, 3)}
    for key, shape in shapes.items():
        assert key in out, f"output {key!r} missing"
        assert tuple(out[key].shape) == shape, f"{key}: shape {tuple(out[key].shape)}, expected {shape}"
        assert out[key].dtype == model.dtype, f"{key}: dtype {out[key].dtype}, expected {model.dtype}"
    assert out[K.NODE_FEATURES].shape[0] == n_atoms, "node_features: one row per atom expected"
    summed = torch.zeros_like(out[K.ENERGY]).index_add(0, batch[K.BATCH], out[K.ATOMIC_ENERGY])
    assert torch.allclose(summed, out[K.ENERGY], atol=atol), "energy is not the sum of atomic_energy"
    _check_force_by_finite_difference(model, batch, out[K.FORCES], atol)
    periodic = batch[K.PBC].all(dim=1)
    assert bool((out[K.STRESS][~periodic] == 0).all()), "stress of a non-periodic structure is not zero"
    for name in (None, "no such fidelity"):
        try:
            model.fidelity_index(name)
        except ValueError:
            continue
        raise AssertionError(f"fidelity_index({name!r}) did not raise ValueError")


def _check_force_by_finite_difference(model, batch, forces, atol, step: float = 1e-4) -> None:
    energies = []
    for sign in (1.0, -1.0):
        shifted = batch[K.POSITIONS].clone()
        shifted[0, 0] += sign * step
        with torch.no_grad():
            energies.append(float(model({**batch, K.POSITIONS: shifted}, compute_forces=False)[K.ENERGY].sum()))
    numeric = -(energies[0] - energies[1]) / (2 * step)
    assert np.isclose(float(forces[0, 0]), numeric, atol=max(atol, 1e-4 * abs(numeric))), (
        f"force {float(forces[0, 0])} eV/A is not -dE/dx = {numeric} eV/A"
    )
