"""The model spec: every hyperparameter a potential is built from, typed and in one place.

:class:`Architecture` holds what a user chooses (the ``model:`` section of a
training config adds only ``dtype``); :class:`ModelSpec` adds what the data
decides (species, fidelity names, mean neighbour count). The model file
stores the spec, ``mfmlip info`` prints it, and
:class:`~mfmlip.model.potential.MFPotential` is built from it and nothing else.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

from mfmlip.model.fidelity import SCHEMES, SITES, scheme_options


class Architecture(BaseModel):
    """Network hyperparameters chosen by the user.

    Attributes
    ----------
    cutoff : neighbour cutoff r_max, Angstrom.
    channels, lmax, num_layers : width, maximum degree l and depth of the backbone.
    num_radial, radial_hidden, envelope_p : Bessel basis size, radial MLP width,
        polynomial envelope exponent.
    fidelity_scheme : how the fidelity enters, a name of
        :data:`mfmlip.model.fidelity.SCHEMES`.
    fidelity_sites, fidelity_dim : options of the scheme (see
        :mod:`mfmlip.model.fidelity`); ``None`` takes the scheme's default, and
        an option the scheme does not have is an error naming it.
    """

    model_config = ConfigDict(extra="forbid")

    cutoff: PositiveFloat = 5.0
    channels: PositiveInt = 32
    lmax: int = Field(1, ge=0, le=4)
    num_layers: PositiveInt = 3
    num_radial: PositiveInt = 8
    radial_hidden: PositiveInt = 64
    envelope_p: PositiveInt = 6
    fidelity_scheme: str = "one_hot_linear"
    fidelity_sites: Optional[list[Literal[SITES]]] = None
    fidelity_dim: Optional[PositiveInt] = None

    @field_validator("fidelity_scheme")
    @classmethod
    def _known_scheme(cls, v):
        if v not in SCHEMES:
            raise ValueError(f"unknown fidelity scheme '{v}'; choose from {sorted(SCHEMES)}")
        return v

    @model_validator(mode="after")
    def _scheme_has_options(self):
        scheme_options(self.fidelity_scheme, sites=self.fidelity_sites, dim=self.fidelity_dim)
        return self

    def fidelity_options(self) -> dict:
        """Keyword options of the fidelity scheme that were given."""
        return scheme_options(self.fidelity_scheme, sites=self.fidelity_sites, dim=self.fidelity_dim)


class ModelSpec(Architecture):
    """:class:`Architecture` plus what the training data decides.

    Attributes
    ----------
    species : atomic numbers the model knows, e.g. ``[1, 6, 8]``.
    fidelities : fidelity names, e.g. ``["GFN2-xTB", "CCSD(T)/CBS"]``; the
        fidelity index of a structure is its position in this list.
    avg_num_neighbors : mean neighbour count in the training set; aggregated
        messages are divided by its square root.

    Examples
    --------
    >>> spec = ModelSpec(species=[1, 8], fidelities=["PBE", "MP2"], channels=8)
    >>> spec.fidelity_scheme, spec.cutoff
    ('one_hot_linear', 5.0)
    """

    species: list[int] = Field(min_length=1)
    fidelities: list[str] = Field(min_length=1)
    avg_num_neighbors: PositiveFloat = 1.0

    @field_validator("fidelities")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"fidelity names must be unique, got {v}")
        return v
