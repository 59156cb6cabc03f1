"""The model file: the model spec, weights, E0s and metadata, written atomically.

Format 3 stores each network as ``{"spec": ModelSpec fields, "state_dict": ...}``;
a delta model stores its two networks, a SevenNet-backed model
(:mod:`mfmlip.model.sevennet`) ``{"sevenn": {"config", "state_dict", "source"}}``.
Files of another format are refused with a message saying what to do.
``load_model`` also takes a name ``sevenn:<model>`` (e.g. ``sevenn:7net-mf-0``).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from mfmlip.atomic_io import atomic_torch_save
from mfmlip.model.delta import DeltaPotential
from mfmlip.model.potential import MFPotential
from mfmlip.model.sevennet import EXTRA, SevenNetPotential, is_sevenn_name
from mfmlip.model.spec import ModelSpec

FORMAT_VERSION = 3  # 3: model spec; blocks receive the fidelity features (2: merged paths, sqrt norm)


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the path and what is wrong."""


def _payload(model: MFPotential) -> dict:
    return {"spec": model.spec.model_dump(), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def save_model(model: MFPotential | DeltaPotential | SevenNetPotential, path: str | Path,
               metadata: dict | None = None) -> None:
    """Write the spec (species, fidelities, cutoff...), weights and E0s to
    ``path``; a :class:`DeltaPotential` is stored as its two models, a
    :class:`SevenNetPotential` as its SevenNet config and weights."""
    if isinstance(model, SevenNetPotential):
        body = {"sevenn": model.payload()}
    elif isinstance(model, DeltaPotential):
        body = {"delta": {"base": _payload(model.base), "correction": _payload(model.correction),
                          "base_fidelity": model.base_fidelity}}
    else:
        body = _payload(model)
    atomic_torch_save({"format_version": FORMAT_VERSION, **body, "metadata": metadata or {}}, path)


def _rebuild(payload: dict) -> MFPotential:
    saved_dtype = payload["state_dict"]["embedding.weight"].dtype
    model = MFPotential(ModelSpec(**payload["spec"])).to(saved_dtype)  # no rounding while loading
    model.load_state_dict(payload["state_dict"])
    return model


def read_model_file(path: str | Path) -> dict:
    """The checked contents of a model file.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ModelFileError
        A directory, an empty, truncated or damaged file, a file that is not
        an mfmlip model (e.g. a training checkpoint), or another format version.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} not found")
    if path.is_dir():
        hint = " (did you mean its model.pt?)" if (path / "model.pt").is_file() else ""
        raise ModelFileError(f"{path} is a directory, not a model file{hint}")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes): not a model file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        what = "truncated or damaged" if zipfile.is_zipfile(path) or _starts_as_zip(path) else "not a torch file"
        raise ModelFileError(f"{path} is not a readable model file: {what} ({type(err).__name__})") from None
    _check_contents(data, path)
    return data


def _starts_as_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _check_contents(data, path: Path) -> None:
    if isinstance(data, dict) and "pytorch-lightning_version" in data:
        raise ModelFileError(f"{path} is a training checkpoint, not a model file; use the model.pt "
                             "that mfmlip train writes in the run's output_dir")
    if not isinstance(data, dict) or "format_version" not in data:
        raise ModelFileError(f"{path} is not an mfmlip model file")
    version = data["format_version"]
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path} has model format {version}, written by a newer mfmlip; this one reads "
                             f"format {FORMAT_VERSION}: upgrade mfmlip")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path} has model format {version}; this mfmlip reads format {FORMAT_VERSION} "
                             "(the architecture changed): retrain with `mfmlip train CONFIG` on this version")
    if "delta" not in data and "sevenn" not in data and not {"spec", "state_dict"} <= set(data):
        raise ModelFileError(f"{path} is not an mfmlip model file (no spec/state_dict)")


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype=torch.float32
) -> MFPotential | DeltaPotential | SevenNetPotential:
    """Rebuild a model from :func:`save_model` output, or load a SevenNet model
    ``sevenn:<name>`` (:mod:`mfmlip.model.sevennet`), in eval mode; the file's
    metadata is in ``model.metadata``.

    Raises
    ------
    FileNotFoundError, ModelFileError
        As :func:`read_model_file`; a ``sevenn:`` name or file without the
        ``sevenn`` package installed (the message names the extra).
    ValueError
        An unknown ``sevenn:`` name (the message lists the shipped ones).
    """
    if is_sevenn_name(path):
        model = _sevenn_or_error(SevenNetPotential.from_name, str(path), path)
        model.metadata = {}
        return model.to(device=device, dtype=dtype).eval()
    data = read_model_file(path)
    if "sevenn" in data:
        model = _sevenn_or_error(SevenNetPotential.from_payload, data["sevenn"], path)
    elif "delta" in data:
        d = data["delta"]
        model = DeltaPotential(_rebuild(d["base"]), d["base_fidelity"], _rebuild(d["correction"]))
    else:
        model = _rebuild(data)
    model.metadata = data.get("metadata", {})
    return model.to(device=device, dtype=dtype).eval()


def _sevenn_or_error(build, argument, path):
    try:
        return build(argument)
    except ImportError:
        raise ModelFileError(f"{path} is a SevenNet model: install the sevenn extra ({EXTRA})") from None


def describe_model(path: str | Path) -> str:
    """A text summary of a model file: the fidelity names to pass as ``--fidelity``
    (with the training structures and labels behind each, when recorded), the
    model spec, parameter count and E0s (eV).

    Raises
    ------
    FileNotFoundError, ModelFileError
        As :func:`load_model`.
    """
    from ase.data import chemical_symbols

    model = load_model(path)
    meta = model.metadata
    delta, sevenn = isinstance(model, DeltaPotential), isinstance(model, SevenNetPotential)
    scheme = "SevenNet one-hot linear (Kim et al.)" if sevenn else (
        model.correction if delta else model).spec.fidelity_scheme
    lines = [f"{path}: {sum(p.numel() for p in model.parameters())} parameters, cutoff {model.cutoff} A, "
             f"species {[chemical_symbols[z] for z in sorted(model.species)]}, scheme {scheme}"
             + (f", delta on {model.base_fidelity}" if delta else "")
             + (f", SevenNet network from {model.source}" if sevenn else ""),
             "fidelities (pass one as --fidelity):"]
    counts = meta.get("training_data", {})
    for name in model.fidelities:
        c = counts.get(name)
        seen = (f"{c['structures']} training structures ({c['energy']} energies, {c['forces']} forces, "
                f"{c['stress']} stresses)" if c else "training data not shipped with the model" if sevenn
                else "training data not recorded")
        e0 = ", ".join(f"{el} {v:.4f}" for el, v in meta.get("e0", {}).get(name, {}).items())
        e0 = e0 or ("the network's per-element shift" if sevenn else "not recorded")
        lines.append(f"  {name!r}: {seen}; E0 (eV): {e0}")
    if sevenn:
        return "\n".join(lines + [f"SevenNet config: {_sevenn_summary(model.config)}"])
    parts = {"base model": model.base, "correction": model.correction} if delta else {"model": model}
    for title, net in parts.items():
        lines.append(f"{title} spec: " + ", ".join(f"{k}={v}" for k, v in _shown_spec(net.spec).items()))
    return "\n".join(lines)


def _shown_spec(spec: ModelSpec) -> dict:
    """The spec without species and fidelities (printed above), options left at their default omitted."""
    return {k: v for k, v in spec.model_dump().items() if k not in ("species", "fidelities") and v is not None}


def _sevenn_summary(config: dict) -> str:
    keys = ("num_convolution_layer", "irreps_manual", "lmax", "channel", "cutoff", "interaction_type", "version")
    return ", ".join(f"{k}={config[k]}" for k in keys if k in config)
