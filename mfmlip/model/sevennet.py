"""SevenNet networks (the ``sevenn`` package) behind mfmlip's potential interface.

``sevenn`` keeps the network: its modules from the edge embedding to the
per-atom energy run unchanged, on edge vectors that mfmlip builds from its own
neighbour list (vesin) and batch; energy, forces and stress then come from
:meth:`mfmlip.model.interface.Potential.forward` like for every mfmlip model.
SevenNet-MF-0 (Kim et al., "Data-efficient multi-fidelity training for
high-fidelity machine learning interatomic potentials", J. Am. Chem. Soc.
2025) conditions its linear layers on a one-hot fidelity vector, the scheme of
mfmlip's ``one_hot_linear``; its fidelities are ``PBE`` and ``R2SCAN``.

A name ``sevenn:<model>`` is a checkpoint shipped inside the ``sevenn`` wheel
(:data:`SHIPPED`; nothing is downloaded) or ``sevenn:<path>`` a SevenNet
checkpoint file. ``sevenn`` is an optional dependency: ``pip install
"mfmlip[sevenn]"``.

Units: eV, Angstrom, eV/Angstrom, eV/Angstrom^3.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mfmlip import keys as K
from mfmlip.model.interface import Potential, structure_energies

PREFIX = "sevenn:"
EXTRA = 'pip install "mfmlip[sevenn]"'
# name -> attribute of sevenn._const holding the path of a checkpoint the wheel ships
SHIPPED = {
    "7net-mf-0": "SEVENNET_MF_0",
    "7net-0": "SEVENNET_0_11Jul2024",
    "7net-0_22may2024": "SEVENNET_0_22May2024",
    "7net-l3i5": "SEVENNET_l3i5",
}
# the fidelity name of a SevenNet model without fidelity input (7net-0, 7net-l3i5: MPtrj, PBE/PBE+U)
SINGLE_FIDELITY = "PBE"
READOUT = "reduce_input_to_hidden"  # first readout module: its input is the invariant node features
RESCALE = "rescale_atomic_energy"


def is_sevenn_name(model) -> bool:
    """True for a string ``sevenn:...`` (a model name, not a file path)."""
    return isinstance(model, str) and model.startswith(PREFIX)


def _sevenn():
    """The ``sevenn`` package, or an ImportError naming the extra to install."""
    try:
        import sevenn
        import sevenn.model_build  # noqa: F401
    except ImportError as err:
        raise ImportError(f"SevenNet models need the sevenn package: {EXTRA} ({err})") from None
    return sevenn


def checkpoint_path(name: str) -> Path:
    """The checkpoint file of ``sevenn:<model>`` or ``sevenn:<path>``.

    Raises
    ------
    ImportError
        ``sevenn`` is not installed (the message names the extra).
    ValueError
        An unknown model name (the message lists the shipped ones).
    FileNotFoundError
        A shipped name whose file is missing from the installed wheel, or a missing path.
    """
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    _sevenn()
    from sevenn import _const

    if key.lower() in SHIPPED:
        path = Path(getattr(_const, SHIPPED[key.lower()]))
        if not path.is_file():
            raise FileNotFoundError(f"{name}: {path} is not in the installed sevenn wheel (mfmlip downloads nothing)")
        return path
    path = Path(key)
    if path.suffix in (".pth", ".pt") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"{name}: SevenNet checkpoint {path} not found")
        return path
    raise ValueError(f"unknown SevenNet model {name!r}; shipped with sevenn: "
                     f"{', '.join(PREFIX + n for n in SHIPPED)}, or give sevenn:<checkpoint path>")


class SevenNetPotential(Potential):
    """A SevenNet network as an mfmlip :class:`~mfmlip.model.interface.Potential`.

    ``E = sum_i [scale_Z * eps_i + shift[f, Z_i]]`` with ``eps`` the network's
    atomic output; the per-fidelity, per-element ``shift`` is the E0 table
    (:attr:`e0`, (n_fidelities, n_species) eV). ``fidelities[k]`` is SevenNet's
    modal of index ``k`` (SevenNet-MF-0: ``["R2SCAN", "PBE"]``); a model
    without modal input has the one fidelity :data:`SINGLE_FIDELITY`.

    Parameters
    ----------
    config : a SevenNet model config (``SevenNetCheckpoint.config``).
    state_dict : the network's weights; None leaves them as built.
    source : where the weights came from (``sevenn:7net-mf-0``), shown by ``mfmlip info``.
    net : the network built from ``config`` already (``state_dict`` is then ignored).

    Raises
    ------
    ImportError
        ``sevenn`` is not installed.

    Examples
    --------
    >>> from mfmlip.model import load_model
    >>> model = load_model("sevenn:7net-mf-0")  # doctest: +SKIP
    >>> model.fidelities, model.cutoff  # doctest: +SKIP
    (['R2SCAN', 'PBE'], 5.0)
    """

    def __init__(self, config: dict, state_dict: dict | None = None, source: str = "sevenn", net=None):
        from sevenn import _keys as SK
        from sevenn.model_build import build_E3_equivariant_model

        type_map = config[SK.TYPE_MAP]
        species = sorted(type_map, key=type_map.get)  # species index == SevenNet's type index
        modal_map = config.get(SK.MODAL_MAP) if config.get(SK.USE_MODALITY) else None
        fidelities = sorted(modal_map, key=modal_map.get) if modal_map else [SINGLE_FIDELITY]
        super().__init__(species, fidelities, float(config[SK.CUTOFF]))
        self.config, self.source, self.has_fidelity_input = config, source, modal_map is not None
        if net is None:
            net = build_E3_equivariant_model(copy.deepcopy(config))
            if state_dict is not None:
                net.load_state_dict(state_dict, strict=True)
        net.delete_module_by_key("force_output")  # Potential.forward differentiates the energy
        net.set_is_batch_data(True)
        net.eval_modal_map, net.key_grad = False, None  # the fidelity index comes from the batch
        self.net = net

    @classmethod
    def from_name(cls, name: str) -> "SevenNetPotential":
        """Load ``sevenn:<model>`` or ``sevenn:<path>`` (see :func:`checkpoint_path`)."""
        path = checkpoint_path(name)
        from sevenn.checkpoint import SevenNetCheckpoint

        checkpoint = SevenNetCheckpoint(str(path))
        net = checkpoint.build_model()  # applies sevenn's patches for old checkpoints
        return cls(checkpoint.config, source=name, net=net)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def e0(self) -> torch.Tensor:
        """(n_fidelities, n_species) per-element energy shift, eV; a view that can be written."""
        shift = self._rescale().shift
        return shift if shift.dim() == 2 else shift.unsqueeze(0)

    def _rescale(self):
        module = self.net._modules.get(RESCALE)
        if module is None or not hasattr(module, "shift"):
            raise ValueError(f"{self.source}: a SevenNet model without a per-element shift module ({RESCALE})")
        return module

    def e0_table(self):
        return self.e0.detach().double().cpu().numpy()

    def energy(self, batch: dict) -> dict:
        """Energy (n_graphs,) eV, atomic_energy (n_atoms,) eV and node_features
        (n_atoms, dim): SevenNet's invariant features before its readout."""
        from sevenn import _keys as SK
        from sevenn.nn.node_embedding import OnehotEmbedding

        self.species_index(batch[K.ATOMIC_NUMBERS])  # unknown elements: a clear error
        positions, cell, graph_of_atom = batch[K.POSITIONS], batch[K.CELL], batch[K.BATCH]
        centre, neighbour = batch[K.EDGE_INDEX]  # SevenNet's edge_index is [centre, neighbour] too
        shifts = torch.einsum("ei,eij->ej", batch[K.SHIFTS].to(cell.dtype), cell[graph_of_atom[centre]])
        data = {
            SK.ATOMIC_NUMBERS: batch[K.ATOMIC_NUMBERS], SK.EDGE_IDX: batch[K.EDGE_INDEX],
            SK.EDGE_VEC: positions[neighbour] - positions[centre] + shifts,
            SK.BATCH: graph_of_atom, SK.MODAL_TYPE: batch[K.FIDELITY], SK.NUM_ATOMS: batch[K.N_ATOMS],
        }
        data = self.net._preprocess(data)
        features = None
        for name, module in self.net._modules.items():
            if name == READOUT:
                features = data[SK.NODE_FEATURE]
            data = module(data)
            if isinstance(module, OnehotEmbedding):  # sevenn's one-hot is float32 whatever the model's dtype
                for key in {module.key_output, module.key_additional_output} - {None}:
                    data[key] = data[key].to(positions.dtype)
        atomic = data[SK.ATOMIC_ENERGY].reshape(-1)
        energy = structure_energies(atomic, graph_of_atom, batch[K.N_ATOMS].shape[0])
        return {K.ENERGY: energy, K.ATOMIC_ENERGY: atomic,
                K.NODE_FEATURES: features if features is not None else atomic[:, None]}

    def payload(self) -> dict:
        """What the model file stores: config, weights and source."""
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        return {"config": self.config, "state_dict": state, "source": self.source}

    @classmethod
    def from_payload(cls, payload: dict) -> "SevenNetPotential":
        model = cls(payload["config"], payload["state_dict"], payload.get("source", "sevenn"))
        return model.to(next(v.dtype for v in payload["state_dict"].values() if v.is_floating_point()))

    def with_fidelity(self, name: str, like: str) -> "SevenNetPotential":
        """A model with one more fidelity ``name`` whose config, state dict layout and
        shift row follow SevenNet's modal layout; the weights are set by
        :func:`mfmlip.model.extend.add_fidelity`.

        Raises
        ------
        ValueError
            A SevenNet model without fidelity (modal) input, e.g. 7net-0.
        """
        from sevenn import _keys as SK

        if not self.has_fidelity_input:
            raise ValueError(f"{self.source} has no fidelity input, so no fidelity can be added; "
                             f"start from {PREFIX}7net-mf-0, or fine-tune it at its own fidelity {SINGLE_FIDELITY!r}")
        config = copy.deepcopy(self.config)
        config[SK.MODAL_MAP] = {**config[SK.MODAL_MAP], name: len(self.fidelities)}
        config[SK.NUM_MODALITIES] = len(self.fidelities) + 1
        config[SK.MODAL_LIST] = [*config.get(SK.MODAL_LIST, self.fidelities), name]
        for key in ("shift", "scale"):
            if isinstance(config.get(key), dict):
                config[key] = {**config[key], name: copy.deepcopy(config[key][like])}
        return SevenNetPotential(config, source=f"{self.source} + {name}").to(self.dtype)
