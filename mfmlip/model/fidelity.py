"""Where the fidelity enters the model.

The backbone (:mod:`mfmlip.model.potential`) holds one
:class:`FidelityConditioning` and never looks at the fidelity index itself. It
asks the conditioning for

* ``features(fidelity_per_atom)``: extra scalar (0e) inputs per atom, computed
  once per forward pass and handed to every block;
* ``at(site, feats)`` and ``extra_dim(site)``: the features to append to the
  input of the linear layer at a named site (``None`` where the site is not
  conditioned) and their width: ``"pre"`` (before each convolution),
  ``"post"`` (after each convolution) and ``"readout"``;
* ``n_heads`` and ``select(...)``: how many atomic-energy outputs the readout
  has, and which one each atom uses.

Each scheme declares its options (``OPTIONS``); an option it does not have is
an error naming it.

Schemes, chosen by name in the config (``model.fidelity_scheme``):

* ``one_hot_linear``: SevenNet-MF (Kim et al.), :class:`OneHotLinear`;
* ``state_embedding``: multi-fidelity M3GNet (Ko & Ong 2025), :class:`StateEmbedding`;
* ``heads``: one readout output per fidelity (hippynn MFL, MACE multi-head), :class:`Heads`.

A new scheme is one subclass registered in ``SCHEMES``.
"""

from __future__ import annotations

import torch

SITES = ("pre", "post", "readout")


class FidelityConditioning(torch.nn.Module):
    """Base interface; see the module docstring.

    Parameters
    ----------
    n_fidelities : number of fidelities the model knows.
    sites : the sites whose linear layers get the fidelity features.

    Raises
    ------
    ValueError
        An unknown site name.
    """

    n_heads = 1
    OPTIONS: tuple[str, ...] = ("sites",)

    def __init__(self, n_fidelities: int, sites: tuple[str, ...] = SITES):
        super().__init__()
        unknown = set(sites) - set(SITES)
        if unknown:
            raise ValueError(f"unknown fidelity sites {sorted(unknown)}; choose from {SITES}")
        self.n_fidelities, self.sites = int(n_fidelities), tuple(sites)

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    def features(self, fidelity: torch.Tensor) -> torch.Tensor:
        """(n_atoms,) long fidelity of each atom -> (n_atoms, feature_dim) float."""
        raise NotImplementedError

    def extra_dim(self, site: str) -> int:
        return self.feature_dim if site in self.sites else 0

    def at(self, site: str, feats: torch.Tensor) -> torch.Tensor | None:
        """The features (n_atoms, feature_dim) to append at ``site``, or None."""
        return feats if site in self.sites else None

    def select(self, heads: torch.Tensor, fidelity: torch.Tensor) -> torch.Tensor:
        """(n_atoms, n_heads) readout outputs -> (n_atoms,) atomic energies."""
        return heads[:, 0]


class OneHotLinear(FidelityConditioning):
    """SevenNet-MF conditioning (Kim et al. 2024/25).

    The fidelity one-hot is appended as extra scalar inputs to the linear
    layers at the chosen sites (default: before and after every convolution
    and in the readout).

    Examples
    --------
    >>> import torch
    >>> c = OneHotLinear(3)
    >>> c.features(torch.tensor([2, 0])).tolist()
    [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """

    @property
    def feature_dim(self) -> int:
        return self.n_fidelities

    def features(self, fidelity: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(fidelity, self.n_fidelities).float()


class StateEmbedding(FidelityConditioning):
    """Multi-fidelity M3GNet conditioning (Ko & Ong, npj Comput. Mater. 2025).

    Each fidelity has a learned state vector of length ``dim`` (16 in the
    paper), appended as a global state to the scalar inputs of every
    interaction block and of the readout.

    Examples
    --------
    >>> import torch
    >>> StateEmbedding(2, dim=4).features(torch.tensor([0, 1, 1])).shape
    torch.Size([3, 4])
    """

    OPTIONS = ("sites", "dim")

    def __init__(self, n_fidelities: int, sites: tuple[str, ...] = SITES, dim: int = 16):
        super().__init__(n_fidelities, sites)
        self.embedding = torch.nn.Embedding(n_fidelities, dim)

    @property
    def feature_dim(self) -> int:
        return self.embedding.embedding_dim

    def features(self, fidelity: torch.Tensor) -> torch.Tensor:
        return self.embedding(fidelity)


class Heads(FidelityConditioning):
    """One atomic-energy output per fidelity on a shared network (hippynn MFL,
    Messerly et al., MLST 2025; MACE multi-head fine-tuning).

    The backbone never sees the fidelity, so the scheme has no options. The
    readout has ``n_fidelities`` outputs and each atom takes the one of its structure.

    Examples
    --------
    >>> import torch
    >>> Heads(2).select(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1, 0])).tolist()
    [2.0, 3.0]
    """

    OPTIONS = ()

    def __init__(self, n_fidelities: int):
        super().__init__(n_fidelities, ())

    @property
    def n_heads(self) -> int:
        return self.n_fidelities

    @property
    def feature_dim(self) -> int:
        return 0

    def features(self, fidelity: torch.Tensor) -> torch.Tensor:
        return torch.zeros(fidelity.shape[0], 0, device=fidelity.device)

    def select(self, heads: torch.Tensor, fidelity: torch.Tensor) -> torch.Tensor:
        return heads.gather(1, fidelity.unsqueeze(1)).squeeze(1)


SCHEMES = {"one_hot_linear": OneHotLinear, "state_embedding": StateEmbedding, "heads": Heads}


def scheme_options(scheme: str, **given) -> dict:
    """The options in ``given`` that are not None, checked against the scheme's ``OPTIONS``.

    Raises
    ------
    ValueError
        An unknown scheme, or an option the scheme does not have (named as the
        config key ``fidelity_<option>``).

    Examples
    --------
    >>> scheme_options("state_embedding", sites=None, dim=8)
    {'dim': 8}
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown fidelity scheme '{scheme}'; choose from {sorted(SCHEMES)}")
    options = {k: v for k, v in given.items() if v is not None}
    allowed = SCHEMES[scheme].OPTIONS
    for name in options:
        if name not in allowed:
            have = ", ".join(f"fidelity_{o}" for o in allowed) or "none"
            raise ValueError(f"fidelity_{name} is not an option of fidelity scheme '{scheme}' (its options: {have})")
    return options


def build_conditioning(scheme: str, n_fidelities: int, **options) -> FidelityConditioning:
    """Instantiate a registered scheme by name; ``options`` as :func:`scheme_options` returns them.

    Raises
    ------
    ValueError
        An unknown scheme name or option.
    """
    options = scheme_options(scheme, **options)
    if "sites" in options:
        options["sites"] = tuple(options["sites"])
    return SCHEMES[scheme](n_fidelities, **options)
