"""Every name in a training config must match something: label keys in the
frames of their file, fidelity names in the data, the device on this machine.

A name that matches nothing is a :class:`ConfigError` naming the key, the file
and what was found instead, never a run that silently trains on nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mfmlip.data.store import StoreFrames
from mfmlip.data.structures import DataError, Structure, frame_keys
from mfmlip.training.config import Config, ConfigError, FileConfig

#: parts of a key's name that suggest it holds this label (for "did you mean")
LABEL_HINTS = {"energy": ("energ",), "forces": ("forc",), "stress": ("stress", "virial")}


def label_counts(structures: list[Structure]) -> dict[str, int]:
    """How many structures carry each label: ``{"energy": n, "forces": n, "stress": n}``."""
    return {
        "energy": sum(bool(np.isfinite(s.energy)) for s in structures),
        "forces": sum(s.forces is not None for s in structures),
        "stress": sum(s.stress is not None for s in structures),
    }


def _required(fc: FileConfig, name: str) -> bool:
    """The entry names this label's key or lists the label in ``labels``."""
    return f"{name}_key" in fc.model_fields_set or "labels" in fc.model_fields_set


def check_label_keys(fc: FileConfig, path: Path, where: str, structures: list[Structure]) -> dict[str, int]:
    """Label counts of one ``data.files`` entry, after checking that its label keys match.

    A trained-on label (``labels``) whose key no frame has is an error when the
    entry names the key or lists the label, when the frames have a key that
    looks like that label (e.g. ``REF_forces``), or when the file would give no
    label at all. A key that frames have but whose values are all missing is
    masked as ``allow_missing_labels`` says.

    Parameters
    ----------
    fc : the entry; path : its file; where : how to name it, e.g. ``data.files[0]``.

    Raises
    ------
    ConfigError
        Names the key, the file, the keys its frames have, and a likely match.
    """
    counts = label_counts(structures)
    missing = [n for n in fc.labels if counts[n] == 0]
    if not missing:
        return counts
    keys = structures.store.source["keys"] if isinstance(structures, StoreFrames) else frame_keys(path, fc.index)
    absent = [n for n in missing if getattr(fc, f"{n}_key") not in keys]  # the others are all NaN: masked
    problems = {}
    for name in absent:
        hints = [k for k in keys if any(h in k.lower() for h in LABEL_HINTS[name])]
        if _required(fc, name) or hints:
            problems[name] = hints
    if not problems and len(missing) == len(fc.labels):  # the file would give no label at all
        problems = dict.fromkeys(absent, [])
    if problems:
        found = [n for n in fc.labels if counts[n]]
        raise ConfigError(
            f"{where} ({path}, index {fc.index!r}): "
            + "; ".join(_no_such_key(fc, name, hints) for name, hints in problems.items())
            + f". The frames have {', '.join(keys) or 'no labels'}. Set the key"
            + (f", or train without the label with labels: [{', '.join(found)}]" if found else "")
        )
    return counts


def _no_such_key(fc: FileConfig, name: str, hints: list[str]) -> str:
    text = f"{name}_key {getattr(fc, f'{name}_key')!r} matches no frame"
    return text + (f"; did you mean {name}_key: {hints[0]}?" if hints else "")


def check_fidelity_names(names, fidelities: list[str], key: str = "training.fidelity_weights") -> None:
    """Every fidelity in ``names`` (the keys of ``training.fidelity_weights`` or
    ``training.sampling``, or the fidelity of ``training.monitor``) is one of ``fidelities``.

    Raises
    ------
    ConfigError
        Names the config ``key``, lists the unknown names, the data's
        fidelities, and a same-but-for-case match.
    """
    unknown = [name for name in names if name not in fidelities]
    if not unknown:
        return
    lower = {f.lower(): f for f in fidelities}
    hints = [f"{name!r} -> {lower[name.lower()]!r}" for name in unknown if name.lower() in lower]
    raise ConfigError(
        f"{key}: {unknown} {'is' if len(unknown) == 1 else 'are'} not a fidelity of the "
        f"data; its fidelities are {fidelities}" + (f" (did you mean {', '.join(hints)}?)" if hints else "")
    )


def check_training_fidelities(training, fidelities: list[str]) -> None:
    """Fidelity names in ``training.fidelity_weights``, ``training.sampling``, the same
    keys of ``training.stage_two``, and ``training.monitor`` all match the data's (:func:`check_fidelity_names`)."""
    check_fidelity_names(training.fidelity_weights, fidelities, "training.fidelity_weights")
    check_fidelity_names(training.sampling, fidelities, "training.sampling")
    if training.stage_two is not None:
        check_fidelity_names(training.stage_two.fidelity_weights, fidelities, "training.stage_two.fidelity_weights")
        check_fidelity_names(training.stage_two.sampling, fidelities, "training.stage_two.sampling")
    monitored = training.monitor.partition("/")[2]  # "val_energy_mae/CCSD(T)/CBS" -> "CCSD(T)/CBS"
    check_fidelity_names([monitored] if monitored else [], fidelities, "training.monitor")


def check_energies_for_e0(cfg: Config, train: list[Structure], files: dict[str, list[str]]) -> None:
    """Every fidelity whose E0 is fitted has energies in the training split.

    ``files`` maps each fidelity to the ``data.files`` entries it comes from.

    Raises
    ------
    DataError
        Names the fidelity, its files and their energy keys.
    """
    with_energy = {s.fidelity for s in train if np.isfinite(s.energy)}
    for fidelity, entries in files.items():
        if fidelity not in with_energy and fidelity not in cfg.data.e0:
            raise DataError(
                f"fidelity {fidelity!r}: no training structure has an energy, so its E0 cannot be fitted "
                f"(from {'; '.join(entries)}); check energy_key and labels, or give data.e0[{fidelity!r}]"
            )


def device_problem(device: str) -> str | None:
    """Why ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``gpu``, ``mps``) cannot be used here, or None."""
    import torch

    kind, _, number = device.partition(":")
    if kind in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            return f"{device!r}: CUDA is not available on this machine (torch {torch.__version__}); use cpu"
        if number and int(number) >= torch.cuda.device_count():
            return f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    if kind == "mps" and not torch.backends.mps.is_available():
        return f"{device!r}: MPS is not available on this machine; use cpu"
    return None


def check_device(cfg: Config) -> None:
    """``training.device`` exists on this machine.

    Raises
    ------
    ConfigError
        Names the device and what to use instead.
    """
    problem = device_problem(cfg.training.device)
    if problem:
        raise ConfigError(f"training.device {problem}")
