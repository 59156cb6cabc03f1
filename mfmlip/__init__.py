"""mfmlip: multi-fidelity E(3)-equivariant machine-learning interatomic potentials.

Units everywhere: eV, Angstrom, eV/Angstrom, eV/Angstrom^3 (ASE sign convention).
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: keep ``import mfmlip`` light for the CLI
    if name == "MFCalculator":
        from mfmlip.simulation.calculator import MFCalculator

        return MFCalculator
    if name in ("load_model", "save_model", "MFPotential"):
        import mfmlip.model as model

        return getattr(model, name)
    if name == "train":
        from mfmlip.training.run import train

        return train
    raise AttributeError(f"module 'mfmlip' has no attribute {name!r}")


__all__ = ["MFCalculator", "MFPotential", "load_model", "save_model", "train", "__version__"]
