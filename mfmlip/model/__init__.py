"""E(3)-equivariant multi-fidelity potential; the fidelity enters in :mod:`.fidelity`.

Built from one spec (:mod:`.spec`), behind one interface (:mod:`.interface`),
predicted through one path (:mod:`.inference`).
"""

from mfmlip.model.delta import DeltaPotential
from mfmlip.model.fidelity import SCHEMES, FidelityConditioning, OneHotLinear
from mfmlip.model.interface import Potential, validate_potential
from mfmlip.model.potential import MFPotential
from mfmlip.model.sevennet import SevenNetPotential
from mfmlip.model.serialization import ModelFileError, load_model, save_model
from mfmlip.model.spec import Architecture, ModelSpec

__all__ = [
    "MFPotential", "DeltaPotential", "SevenNetPotential", "Potential", "validate_potential", "ModelSpec", "Architecture",
    "FidelityConditioning", "OneHotLinear", "SCHEMES", "ModelFileError", "load_model", "save_model",
]
