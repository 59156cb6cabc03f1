"""The multi-fidelity potential: equivariant backbone + fidelity conditioning + E0.

The fidelity enters only through ``self.fidelity`` (:mod:`mfmlip.model.fidelity`).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from ase.data import chemical_symbols
from e3nn import o3

from mfmlip import keys as K
from mfmlip.model.blocks import Interaction, Readout, hidden_irreps
from mfmlip.model.fidelity import SITES, build_conditioning
from mfmlip.model.radial import RadialBasis


class MFPotential(torch.nn.Module):
    """E(3)-equivariant multi-fidelity interatomic potential.

    ``E = sum_i [scale * eps_f(i) + E0[f, Z_i]]`` where ``eps`` is the readout
    of the last interaction block for fidelity ``f`` of the structure,
    ``forces = -dE/dr`` and ``stress = (1/V) dE/d(strain)`` (ASE sign).

    Parameters
    ----------
    species : atomic numbers the model knows, e.g. ``[1, 6, 8]``.
    fidelities : fidelity names, e.g. ``["GFN2-xTB", "CCSD(T)/CBS"]``.
    cutoff : neighbour cutoff r_max, Angstrom.
    channels, lmax, num_layers : width, maximum degree l and depth of the backbone.
    num_radial, radial_hidden, envelope_p : Bessel basis size, radial MLP width,
        polynomial envelope exponent.
    avg_num_neighbors : mean neighbour count; aggregated messages are divided by its square root.
    fidelity_scheme, fidelity_sites, fidelity_dim : see :mod:`mfmlip.model.fidelity`
        (``fidelity_dim`` is the state-vector length of ``state_embedding``).
    e0 : (n_fidelities, n_species) reference energies in eV; zeros if None.
    energy_scale : eV, multiplies the readout.

    Examples
    --------
    >>> import torch
    >>> from ase.build import molecule
    >>> from mfmlip.model.potential import MFPotential
    >>> from mfmlip.data import atoms_to_batch
    >>> model = MFPotential([1, 8], ["PBE", "MP2"], channels=8, lmax=1, num_layers=1)
    >>> out = model(atoms_to_batch(molecule("H2O"), model.cutoff, fidelity_index=1))
    >>> out["energy"].shape, out["forces"].shape
    (torch.Size([1]), torch.Size([3, 3]))
    """

    def __init__(
        self,
        species: list[int],
        fidelities: list[str],
        cutoff: float = 5.0,
        channels: int = 32,
        lmax: int = 1,
        num_layers: int = 3,
        num_radial: int = 8,
        radial_hidden: int = 64,
        envelope_p: int = 6,
        avg_num_neighbors: float = 1.0,
        fidelity_scheme: str = "one_hot_linear",
        fidelity_sites: tuple[str, ...] = SITES,
        fidelity_dim: int = 16,
        e0=None,
        energy_scale: float = 1.0,
    ):
        super().__init__()
        self.hparams = dict(
            species=[int(z) for z in species], fidelities=list(fidelities), cutoff=float(cutoff),
            channels=channels, lmax=lmax, num_layers=num_layers, num_radial=num_radial,
            radial_hidden=radial_hidden, envelope_p=envelope_p,
            avg_num_neighbors=float(avg_num_neighbors), fidelity_scheme=fidelity_scheme,
            fidelity_sites=list(fidelity_sites), fidelity_dim=int(fidelity_dim),
        )
        self.species, self.fidelities, self.cutoff = list(self.hparams["species"]), list(fidelities), float(cutoff)
        z_to_species = torch.full((119,), -1, dtype=torch.long)
        z_to_species[torch.tensor(self.species)] = torch.arange(len(self.species))
        self.register_buffer("z_to_species", z_to_species)
        e0 = torch.zeros(len(fidelities), len(species)) if e0 is None else e0
        # full precision until the model is cast with .to(dtype)
        self.register_buffer("e0", torch.as_tensor(e0, dtype=torch.float64).clone())
        self.register_buffer("energy_scale", torch.tensor(float(energy_scale)))

        self.fidelity = build_conditioning(
            fidelity_scheme, len(fidelities), sites=tuple(fidelity_sites), dim=fidelity_dim
        )
        self.embedding = torch.nn.Embedding(len(species), channels)
        self.radial = RadialBasis(cutoff, num_radial, envelope_p)
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        irreps = o3.Irreps(f"{channels}x0e")
        self.blocks = torch.nn.ModuleList()
        for layer in range(num_layers):
            target = hidden_irreps(channels, 0 if layer == num_layers - 1 else lmax)
            block = Interaction(
                irreps, target, self.irreps_sh, num_radial, radial_hidden, avg_num_neighbors, self.fidelity
            )
            self.blocks.append(block)
            irreps = block.irreps_out
        self.readout = Readout(
            channels + self.fidelity.extra_dim("readout"), max(channels // 2, 8), self.fidelity.n_heads
        )

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the weights; inputs are cast to it."""
        return self.embedding.weight.dtype

    # -- lookups ------------------------------------------------------------
    def species_index(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        """(n_atoms,) atomic numbers -> species indices.

        Raises
        ------
        ValueError
            An element the model was not trained on.
        """
        idx = self.z_to_species[atomic_numbers]
        if (idx < 0).any():
            bad = sorted({chemical_symbols[int(z)] for z in atomic_numbers[idx < 0]})
            known = [chemical_symbols[z] for z in self.species]
            raise ValueError(f"element(s) {bad} unknown to this model; it knows {known}")
        return idx

    def fidelity_index(self, name: str) -> int:
        """Index of a fidelity name.

        Raises
        ------
        ValueError
            A missing or unknown fidelity; the message lists the model's ones.
        """
        if name not in self.fidelities:
            raise ValueError(f"unknown fidelity {name!r}; this model has {self.fidelities}")
        return self.fidelities.index(name)

    # -- forward ------------------------------------------------------------
    def forward(self, batch: dict, compute_forces: bool = True, compute_stress: bool = False) -> dict:
        """Energy (n_graphs,) eV, atomic_energy (n_atoms,) eV, node_features
        (n_atoms, channels), forces (n_atoms, 3) eV/Angstrom if ``compute_forces``,
        stress (n_graphs, 3, 3) eV/Angstrom^3 if ``compute_stress`` (zero for
        non-periodic structures). Floating inputs are cast to the model's
        dtype. Gradients are kept for training when the module is in training mode.
        """
        species = self.species_index(batch[K.ATOMIC_NUMBERS])
        graph_of_atom = batch[K.BATCH]
        n_graphs = batch[K.N_ATOMS].shape[0]
        fid_atom = batch[K.FIDELITY][graph_of_atom]
        dtype = self.dtype
        # derivatives need a graph even under no_grad; otherwise the caller's grad mode holds
        with torch.enable_grad() if compute_forces or compute_stress else contextlib.nullcontext():
            positions, cell = batch[K.POSITIONS].to(dtype), batch[K.CELL].to(dtype)
            if compute_forces:
                positions = positions.detach().requires_grad_(True)
            inputs = [positions] if compute_forces else []
            if compute_stress:
                strain = torch.zeros_like(cell, requires_grad=True)
                inputs.append(strain)
                sym = 0.5 * (strain + strain.transpose(1, 2))
                positions_s = positions + torch.einsum("ai,aij->aj", positions, sym[graph_of_atom])
                cell = cell + torch.bmm(cell, sym)
            else:
                positions_s = positions
            out = self._energy(species, fid_atom, graph_of_atom, n_graphs, positions_s, cell, batch)
            if inputs:
                grads = torch.autograd.grad(
                    out[K.ENERGY].sum(), inputs, create_graph=self.training, allow_unused=True
                )
                grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
        if compute_forces:
            out[K.FORCES] = -grads[0]
        if compute_stress:
            volume = torch.linalg.det(batch[K.CELL].to(dtype)).abs()
            periodic = batch[K.PBC].all(dim=1) & (volume > 0)
            out[K.STRESS] = torch.where(
                periodic[:, None, None], grads[-1] / volume.clamp(min=1e-12)[:, None, None], 0.0
            )
        return out

    def _energy(self, species, fid_atom, graph_of_atom, n_graphs, positions, cell, batch) -> dict:
        centre, neighbour = batch[K.EDGE_INDEX]
        shifts = torch.einsum("ei,eij->ej", batch[K.SHIFTS].to(cell.dtype), cell[graph_of_atom[centre]])
        vectors = positions[neighbour] - positions[centre] + shifts
        sh = o3.spherical_harmonics(self.irreps_sh, vectors, normalize=True, normalization="component")
        radial = self.radial(vectors.norm(dim=-1))
        feats = self.fidelity.features(fid_atom)
        h = self.embedding(species)
        for block in self.blocks:
            h = block(h, feats, sh, radial, batch[K.EDGE_INDEX])
        heads = self.readout(self.fidelity.augment(h, feats, "readout"))
        atomic = self.fidelity.select(heads, fid_atom) * self.energy_scale + self.e0[fid_atom, species].to(h.dtype)
        energy = torch.zeros(n_graphs, dtype=atomic.dtype, device=atomic.device).index_add(
            0, graph_of_atom, atomic
        )
        return {K.ENERGY: energy, K.ATOMIC_ENERGY: atomic, K.NODE_FEATURES: h}

    def e0_table(self) -> np.ndarray:
        """(n_fidelities, n_species) reference energies, eV."""
        return self.e0.detach().cpu().numpy()
