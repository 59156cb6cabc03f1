"""A training run's output folder: never mix with or destroy an earlier run.

A run writes its resolved config to ``output_dir/config.yaml`` (and the
SHA-256 of the split files it names to ``split_files.json``). A second run
into a folder that holds an earlier one (checkpoints or a model file) is
refused unless it resumes (``--resume``: the config may then change only in
keys that alter neither the model nor the data) or replaces it
(``--overwrite``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from mfmlip.atomic_io import atomic_write
from mfmlip.training.config import Config, ConfigError

CONFIG_FILE = "config.yaml"
SPLITS_FILE = "split_files.json"
#: files and folders of a run that --overwrite removes (the config file is rewritten instead)
RUN_PRODUCTS = ("checkpoints", "logs", "model.pt", "test_metrics.json", "parity_test.png")
#: training keys that alter the model; every other training key may change on --resume
MODEL_TRAINING_KEYS = ("init_from", "new_fidelity_like", "delta_from", "delta_fidelity")


def earlier_run(out: Path) -> list[str]:
    """The files in ``out`` that show it holds a run: checkpoints and the model file."""
    found = sorted(p.relative_to(out).as_posix() for p in (out / "checkpoints").glob("*.ckpt"))
    return found + (["model.pt"] if (out / "model.pt").is_file() else [])


def resolved_config(cfg: Config, root: Path) -> dict:
    """The config as plain data, with ``data.root`` the data folder actually used."""
    raw = cfg.model_dump(mode="json")
    raw["data"]["root"] = str(Path(root).resolve())
    return raw


def split_digests(cfg: Config) -> dict[str, str]:
    """``{"data.files.N.split.file": sha256}`` of the split files the config names ("" if missing)."""
    base = cfg.path.parent if cfg.path else Path.cwd()
    digests = {}
    for i, fc in enumerate(cfg.data.files):
        if fc.split.file:
            path = Path(fc.split.file) if Path(fc.split.file).is_absolute() else base / fc.split.file
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            digests[f"data.files.{i}.split.file"] = digest
    return digests


def write_run_config(cfg: Config, out: Path, root: Path) -> Path:
    """Write :func:`resolved_config` to ``out/config.yaml`` and, when the config
    names split files, their :func:`split_digests` to ``out/split_files.json``,
    atomically; return the config's path."""
    text = yaml.safe_dump(resolved_config(cfg, root), sort_keys=False)
    atomic_write(out / CONFIG_FILE, lambda fh: fh.write(text), mode="w")
    digests = split_digests(cfg)
    if digests:
        atomic_write(out / SPLITS_FILE, lambda fh: fh.write(json.dumps(digests, indent=2)), mode="w")
    return out / CONFIG_FILE


def _flat(value, prefix: str = "") -> dict:
    """``{"model.cutoff": 5.0, "data.files.0.path": ...}``: nested dicts and lists by key path."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if items is None:
        return {prefix: value}
    flat = {}
    for key, inner in items:
        flat.update(_flat(inner, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _alters_model_or_data(key: str) -> bool:
    if key == "data.root":  # where the data lies, not what it is
        return False
    top, _, rest = key.partition(".")
    return top in ("seed", "model", "data") or (top == "training" and rest.split(".")[0] in MODEL_TRAINING_KEYS)


def changed_keys(old: dict, new: dict) -> list[str]:
    """``"key: old -> new"`` for every key path that differs and alters the model or the data."""
    a, b = _flat(old), _flat(new)
    return [
        f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
        for k in sorted(set(a) | set(b)) if _alters_model_or_data(k) and a.get(k) != b.get(k)
    ]


def prepare_output_dir(cfg: Config, out: Path, root: Path, resume: bool = False, overwrite: bool = False) -> None:
    """Check that a run may write into ``out``; with ``overwrite``, clear an earlier run.

    Raises
    ------
    ConfigError
        ``out`` holds an earlier run and neither flag is given; ``resume`` finds
        a finished run without ``checkpoints/last.ckpt``, or a config that
        differs from the stored one in the model or the data (the keys are named).
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if overwrite:
        _delete_run(out)
        return
    found = earlier_run(out)
    if not found:
        return
    if not resume:
        raise ConfigError(
            f"output_dir {out} holds an earlier run ({', '.join(found)}); use --resume to continue it, "
            "--overwrite to replace it, or another output_dir"
        )
    if not (out / "checkpoints" / "last.ckpt").is_file():
        raise ConfigError(f"--resume: {out} holds a run ({', '.join(found)}) but no checkpoints/last.ckpt to "
                          "continue from; use --overwrite to replace it")
    _check_same_run(cfg, out, root)


def _delete_run(out: Path) -> None:
    for name in RUN_PRODUCTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _check_same_run(cfg: Config, out: Path, root: Path) -> None:
    stored = out / CONFIG_FILE
    if not stored.is_file():
        print(f"--resume: {out} has no {CONFIG_FILE} (an older run): the config cannot be compared", flush=True)
        return
    try:
        old = yaml.safe_load(stored.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--resume: {stored} is not valid YAML: {err}") from None
    changed = changed_keys(old if isinstance(old, dict) else {}, resolved_config(cfg, root)) + _changed_splits(cfg, out)
    if changed:
        raise ConfigError(
            f"--resume: the config changes the model or the data of the run in {out} ({stored}):\n  "
            + "\n  ".join(changed)
            + "\nrevert these keys to continue the run, or train into another output_dir (or --overwrite)"
        )


def _changed_splits(cfg: Config, out: Path) -> list[str]:
    """``"key: content changed"`` for each split file whose digest differs from the stored one."""
    stored = out / SPLITS_FILE
    old = json.loads(stored.read_text()) if stored.is_file() else {}
    return [f"{key}: {cfg.data.files[int(key.split('.')[2])].split.file} changed since the run started"
            for key, digest in split_digests(cfg).items() if key in old and old[key] != digest]
