"""E(3)-equivariant multi-fidelity potential; the fidelity enters in :mod:`.fidelity`."""

from mfmlip.model.delta import DeltaPotential
from mfmlip.model.fidelity import SCHEMES, FidelityConditioning, OneHotLinear
from mfmlip.model.potential import MFPotential
from mfmlip.model.serialization import load_model, save_model

__all__ = ["MFPotential", "DeltaPotential", "FidelityConditioning", "OneHotLinear", "SCHEMES", "load_model", "save_model"]
