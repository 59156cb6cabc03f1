"""A torch-sim model for a trained mfmlip potential at a chosen fidelity.

torch-sim (PyPI package ``torch-sim-atomistic``, the optional extra
``pip install "mfmlip[torchsim]"``) relaxes structures and runs molecular
dynamics on many systems at once, as one batch. :class:`MFTorchSimModel` is
its :class:`torch_sim.models.interface.ModelInterface` for an mfmlip model::

    import torch_sim as ts
    from ase.build import bulk
    from mfmlip.simulation.torchsim import MFTorchSimModel

    model = MFTorchSimModel("runs/silicon/model.pt", fidelity="PBE", dtype="float64")
    systems = [bulk("Si", "diamond", a=5.43, cubic=True), bulk("Si", "diamond", a=5.5) * (2, 2, 2)]
    relaxed = ts.optimize(systems, model, optimizer=ts.frechet_cell_fire, max_steps=200)
    hot = ts.integrate(systems, model, integrator=ts.nvt_langevin, n_steps=100,
                       temperature=300, timestep=0.001)   # torch-sim's metal units: K, ps

Units are those of mfmlip and ASE (torch-sim's ``metal`` system): positions
and cell in Angstrom, energy in eV, forces in eV/Angstrom, stress in
eV/Angstrom^3 with ASE's sign (``stress = (1/V) dE/d(strain)``), the sign
torch-sim's cell optimisers and barostats use. Written against
torch-sim-atomistic 0.3 (the last release for Python 3.11): its ``SimState``
stores the cell as column vectors (``state.cell[b] = atoms.cell.array.T``)
and ``pbc`` as one bool for the whole batch; a per-direction ``pbc`` tensor,
as newer releases have, is accepted too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

try:
    from torch_sim.models.interface import ModelInterface
    from torch_sim.state import SimState
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mfmlip.simulation.torchsim needs torch-sim: pip install 'mfmlip[torchsim]' "
        "(the package torch-sim-atomistic)"
    ) from err

from mfmlip import keys as K
from mfmlip.data.graph import MIN_DISTANCE
from mfmlip.data.structures import Structure
from mfmlip.model.inference import Predictor


class MFTorchSimModel(ModelInterface):
    """torch-sim model: energies, forces and stress of a batch of systems at one fidelity.

    Parameters
    ----------
    model : path of a model file written by ``mfmlip train``, or an
        :class:`~mfmlip.model.MFPotential` or :class:`~mfmlip.model.delta.DeltaPotential`.
    fidelity : the level of theory to reproduce; required, no default.
    device : torch device of the model; torch-sim puts its state there.
    dtype : ``"float32"``, ``"float64"`` or a torch dtype; default: the model
        object's own dtype, or float32 for a model file (float64 is the better
        choice for relaxations to tight tolerances and long NVE runs).
    compute_forces, compute_stress : whether :meth:`forward` returns forces
        and stress; stress needs every system 3D-periodic.
    min_distance : Angstrom; a system with two atoms closer than this is
        refused, as by :class:`mfmlip.MFCalculator`.

    Raises
    ------
    ValueError
        Missing or unknown fidelity (the message lists the model's fidelities).

    Notes
    -----
    :meth:`forward` returns ``{"energy": (n_systems,), "forces": (n_atoms, 3),
    "stress": (n_systems, 3, 3)}`` (eV, eV/Angstrom, eV/Angstrom^3), detached,
    in the state's dtype. Neighbour lists are built per system on the CPU
    (vesin), as for the ASE calculator; the network itself runs on the whole
    batch at once.
    """

    def __init__(
        self,
        model: str | Path | torch.nn.Module,
        fidelity: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        compute_forces: bool = True,
        compute_stress: bool = True,
        min_distance: float = MIN_DISTANCE,
    ):
        super().__init__()
        self.predictor = Predictor(model, fidelity, device, dtype, min_distance)
        self._device, self._dtype = torch.device(device), self.predictor.dtype
        self._compute_forces, self._compute_stress = bool(compute_forces), bool(compute_stress)
        self._memory_scales_with = "n_atoms_x_density"  # radial cutoff

    @property
    def model(self):
        """The potential (:class:`~mfmlip.model.interface.Potential`)."""
        return self.predictor.model

    @property
    def fidelity(self) -> str:
        """The fidelity predicted; assigning a name switches it (checked)."""
        return self.predictor.fidelity

    @fidelity.setter
    def fidelity(self, name: str) -> None:
        self.predictor.set_fidelity(name)

    # torch-sim's validator and some workflows switch these on and off
    @ModelInterface.compute_stress.setter
    def compute_stress(self, value: bool) -> None:
        self._compute_stress = bool(value)

    @ModelInterface.compute_forces.setter
    def compute_forces(self, value: bool) -> None:
        self._compute_forces = bool(value)

    def _graphs(self, positions, row_cells, pbc, atomic_numbers, system_idx) -> dict:
        """One mfmlip batch of every system of the state (numpy neighbour lists)."""
        pos = positions.detach().cpu().to(torch.float64).numpy()
        cells = row_cells.detach().cpu().to(torch.float64).numpy()
        numbers = atomic_numbers.detach().cpu().numpy().astype(np.int64)
        idx = system_idx.detach().cpu().numpy()
        n_systems = cells.shape[0]
        counts = np.bincount(idx, minlength=n_systems)
        if len(idx) and np.any(np.diff(idx) < 0):
            raise ValueError("system_idx must be sorted (the atoms of each system contiguous), as torch-sim keeps it")
        structures, start = [], 0
        for b in range(n_systems):
            stop = start + int(counts[b])
            structures.append(Structure(positions=pos[start:stop], atomic_numbers=numbers[start:stop], cell=cells[b],
                                        pbc=pbc, fidelity=self.fidelity, source=f"torch-sim system {b}"))
            start = stop
        return self.predictor.batch(structures)

    def forward(self, state: SimState | dict, **kwargs) -> dict[str, torch.Tensor]:
        """Energy (n_systems,) eV, forces (n_atoms, 3) eV/Angstrom and stress
        (n_systems, 3, 3) eV/Angstrom^3 of every system of ``state``.

        ``state`` is a :class:`torch_sim.state.SimState` or a dict with
        ``positions``, ``cell`` (column vectors, as in a SimState),
        ``atomic_numbers`` and optionally ``system_idx`` (default: one system)
        and ``pbc`` (default: periodic).

        Raises
        ------
        ValueError
            An element the model does not know, atoms closer than
            ``min_distance``, or stress asked of a state that is not 3D-periodic.
        """
        get = state.get if isinstance(state, dict) else lambda k, default=None: getattr(state, k, default)
        positions, cell, numbers = get("positions"), get("cell"), get("atomic_numbers")
        system_idx = get("system_idx")
        if system_idx is None:
            system_idx = torch.zeros(len(positions), dtype=torch.long, device=positions.device)
        if cell.dim() == 2:
            cell = cell.unsqueeze(0)
        pbc = get("pbc")
        pbc = np.broadcast_to(np.asarray(torch.as_tensor(True if pbc is None else pbc).cpu(), dtype=bool), (3,)).copy()
        want_stress = self._compute_stress
        if want_stress and not pbc.all():
            raise ValueError(f"stress needs 3D-periodic systems, got pbc={pbc.tolist()}; "
                             "build the model with compute_stress=False")
        batch = self._graphs(positions, cell.mT, pbc, numbers, system_idx)
        out = self.predictor(batch, forces=self._compute_forces, stress=want_stress)
        keys = [K.ENERGY] + [K.FORCES] * self._compute_forces + [K.STRESS] * want_stress
        return {k: out[k].to(device=positions.device, dtype=positions.dtype) for k in keys}
