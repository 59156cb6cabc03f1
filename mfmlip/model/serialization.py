"""The model file: everything needed to predict, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from mfmlip.atomic_io import atomic_write
from mfmlip.model.potential import MFPotential

FORMAT_VERSION = 1


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` through :func:`mfmlip.atomic_io.atomic_write`.

    A kill during the write leaves any previous file at ``path`` intact.
    """
    atomic_write(path, lambda fh: torch.save(obj, fh))


def save_model(model: MFPotential, path: str | Path, metadata: dict | None = None) -> None:
    """Write hyperparameters (species, fidelities, cutoff...), weights and E0s to ``path``."""
    atomic_torch_save(
        {
            "format_version": FORMAT_VERSION,
            "hparams": model.hparams,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "metadata": metadata or {},
        },
        path,
    )


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype=torch.float32) -> MFPotential:
    """Rebuild a model from :func:`save_model` output, in eval mode.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file is not an mfmlip model file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found")
    data = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(data, dict) or "hparams" not in data or "state_dict" not in data:
        raise ValueError(f"{path} is not an mfmlip model file (no hparams/state_dict)")
    saved_dtype = data["state_dict"]["embedding.weight"].dtype
    model = MFPotential(**data["hparams"]).to(saved_dtype)  # no rounding while loading
    model.load_state_dict(data["state_dict"])
    model.metadata = data.get("metadata", {})
    return model.to(device=device, dtype=dtype).eval()
