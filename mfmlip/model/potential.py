"""The multi-fidelity potential: equivariant backbone + fidelity conditioning + E0.

The fidelity enters in one place: ``self.fidelity`` (:mod:`mfmlip.model.fidelity`)
turns each atom's fidelity index into features once per pass, in
:meth:`MFPotential.energy`, and hands them to the blocks and the readout.
"""

from __future__ import annotations

import numpy as np
import torch
from e3nn import o3

from mfmlip import keys as K
from mfmlip.model.blocks import Interaction, Readout, append, hidden_irreps
from mfmlip.model.fidelity import build_conditioning
from mfmlip.model.interface import Potential, structure_energies
from mfmlip.model.radial import RadialBasis
from mfmlip.model.spec import ModelSpec


class MFPotential(Potential):
    """E(3)-equivariant multi-fidelity interatomic potential.

    ``E = sum_i [scale * eps_f(i) + E0[f, Z_i]]`` where ``eps`` is the readout
    of the last interaction block for fidelity ``f`` of the structure,
    ``forces = -dE/dr`` and ``stress = (1/V) dE/d(strain)`` (ASE sign), from
    :class:`~mfmlip.model.interface.Potential`.

    Parameters
    ----------
    spec : every hyperparameter (:class:`~mfmlip.model.spec.ModelSpec`).
    e0 : (n_fidelities, n_species) reference energies in eV; zeros if None.
    energy_scale : eV, multiplies the readout.

    Examples
    --------
    >>> import torch
    >>> from ase.build import molecule
    >>> from mfmlip.model import MFPotential, ModelSpec
    >>> from mfmlip.data import atoms_to_batch
    >>> model = MFPotential(ModelSpec(species=[1, 8], fidelities=["PBE", "MP2"], channels=8, num_layers=1))
    >>> out = model(atoms_to_batch(molecule("H2O"), model.cutoff, fidelity_index=1))
    >>> out["energy"].shape, out["forces"].shape
    (torch.Size([1]), torch.Size([3, 3]))
    """

    def __init__(self, spec: ModelSpec, e0=None, energy_scale: float = 1.0):
        super().__init__(spec.species, spec.fidelities, spec.cutoff)
        self.spec = spec
        e0 = torch.zeros(len(spec.fidelities), len(spec.species)) if e0 is None else e0
        # full precision until the model is cast with .to(dtype)
        self.register_buffer("e0", torch.as_tensor(e0, dtype=torch.float64).clone())
        self.register_buffer("energy_scale", torch.tensor(float(energy_scale)))

        self.fidelity = build_conditioning(spec.fidelity_scheme, len(spec.fidelities), **spec.fidelity_options())
        channels = spec.channels
        self.embedding = torch.nn.Embedding(len(spec.species), channels)
        self.radial = RadialBasis(spec.cutoff, spec.num_radial, spec.envelope_p)
        self.irreps_sh = o3.Irreps.spherical_harmonics(spec.lmax)
        irreps = o3.Irreps(f"{channels}x0e")
        self.blocks = torch.nn.ModuleList()
        for layer in range(spec.num_layers):
            target = hidden_irreps(channels, 0 if layer == spec.num_layers - 1 else spec.lmax)
            block = Interaction(
                irreps, target, self.irreps_sh, spec.num_radial, spec.radial_hidden, spec.avg_num_neighbors,
                self.fidelity.extra_dim("pre"), self.fidelity.extra_dim("post"),
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

    def energy(self, batch: dict) -> dict:
        """Energy (n_graphs,) eV, atomic_energy (n_atoms,) eV including E0, and
        node_features (n_atoms, channels), from ``positions`` and ``cell`` in ``batch``."""
        species = self.species_index(batch[K.ATOMIC_NUMBERS])
        graph_of_atom = batch[K.BATCH]
        fid_atom = batch[K.FIDELITY][graph_of_atom]
        positions, cell = batch[K.POSITIONS], batch[K.CELL]
        centre, neighbour = batch[K.EDGE_INDEX]
        shifts = torch.einsum("ei,eij->ej", batch[K.SHIFTS].to(cell.dtype), cell[graph_of_atom[centre]])
        vectors = positions[neighbour] - positions[centre] + shifts
        sh = o3.spherical_harmonics(self.irreps_sh, vectors, normalize=True, normalization="component")
        radial = self.radial(vectors.norm(dim=-1))
        feats = self.fidelity.features(fid_atom)  # the fidelity enters here, once
        pre, post = self.fidelity.at("pre", feats), self.fidelity.at("post", feats)
        h = self.embedding(species)
        for block in self.blocks:
            h = block(h, sh, radial, batch[K.EDGE_INDEX], pre, post)
        heads = self.readout(append(h, self.fidelity.at("readout", feats)))
        atomic = self.fidelity.select(heads, fid_atom) * self.energy_scale + self.e0[fid_atom, species].to(h.dtype)
        energy = structure_energies(atomic, graph_of_atom, batch[K.N_ATOMS].shape[0])
        return {K.ENERGY: energy, K.ATOMIC_ENERGY: atomic, K.NODE_FEATURES: h}

    def e0_table(self) -> np.ndarray:
        """(n_fidelities, n_species) reference energies, eV."""
        return self.e0.detach().cpu().numpy()
