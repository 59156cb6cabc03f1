"""The model file: everything needed to predict, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from mfmlip.atomic_io import atomic_write
from mfmlip.model.delta import DeltaPotential
from mfmlip.model.potential import MFPotential

FORMAT_VERSION = 2  # 2: merged tensor-product paths, messages / sqrt(avg_num_neighbors)


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` through :func:`mfmlip.atomic_io.atomic_write`.

    A kill during the write leaves any previous file at ``path`` intact.
    """
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _payload(model: MFPotential) -> dict:
    return {"hparams": model.hparams, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def save_model(model: MFPotential | DeltaPotential, path: str | Path, metadata: dict | None = None) -> None:
    """Write hyperparameters (species, fidelities, cutoff...), weights and E0s to
    ``path``; a :class:`DeltaPotential` is stored as its two models."""
    if isinstance(model, DeltaPotential):
        body = {"delta": {"base": _payload(model.base), "correction": _payload(model.correction),
                          "base_fidelity": model.base_fidelity}}
    else:
        body = _payload(model)
    atomic_torch_save({"format_version": FORMAT_VERSION, **body, "metadata": metadata or {}}, path)


def _rebuild(payload: dict) -> MFPotential:
    saved_dtype = payload["state_dict"]["embedding.weight"].dtype
    model = MFPotential(**payload["hparams"]).to(saved_dtype)  # no rounding while loading
    model.load_state_dict(payload["state_dict"])
    return model


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype=torch.float32
) -> MFPotential | DeltaPotential:
    """Rebuild a model from :func:`save_model` output, in eval mode.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file is not an mfmlip model file, or has another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found")
    data = torch.load(path, map_location="cpu", weights_only=False)
    version = data.get("format_version") if isinstance(data, dict) else None
    if version is not None and version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has model format {version}; this mfmlip reads format {FORMAT_VERSION} "
            "(the architecture changed); retrain with this version"
        )
    if isinstance(data, dict) and "delta" in data:
        d = data["delta"]
        model = DeltaPotential(_rebuild(d["base"]), d["base_fidelity"], _rebuild(d["correction"]))
    elif isinstance(data, dict) and "hparams" in data and "state_dict" in data:
        model = _rebuild(data)
    else:
        raise ValueError(f"{path} is not an mfmlip model file (no hparams/state_dict)")
    model.metadata = data.get("metadata", {})
    return model.to(device=device, dtype=dtype).eval()


def describe_model(path: str | Path) -> str:
    """A text summary of a model file: the fidelity names to pass as ``--fidelity``
    (with the training structures and labels behind each, when recorded), species,
    cutoff (Angstrom), scheme, parameter count and E0s (eV).

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`load_model`.
    """
    from ase.data import chemical_symbols

    model = load_model(path)
    meta = model.metadata
    delta = isinstance(model, DeltaPotential)
    scheme = (model.correction if delta else model).hparams["fidelity_scheme"]
    lines = [f"{path}: {sum(p.numel() for p in model.parameters())} parameters, cutoff {model.cutoff} A, "
             f"species {[chemical_symbols[z] for z in model.species]}, scheme {scheme}"
             + (f", delta on {model.base_fidelity}" if delta else ""),
             "fidelities (pass one as --fidelity):"]
    counts = meta.get("training_data", {})
    for name in model.fidelities:
        c = counts.get(name)
        seen = (f"{c['structures']} training structures ({c['energy']} energies, {c['forces']} forces, "
                f"{c['stress']} stresses)" if c else "training data not recorded")
        e0 = ", ".join(f"{el} {v:.4f}" for el, v in meta.get("e0", {}).get(name, {}).items())
        lines.append(f"  {name!r}: {seen}; E0 (eV): {e0 or 'not recorded'}")
    return "\n".join(lines)
