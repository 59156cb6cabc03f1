"""The training configuration: one YAML file validated with pydantic.

Units: cutoff in Angstrom; filter thresholds in eV/atom and eV/Angstrom;
loss weights are dimensionless multipliers of per-atom energy (eV/atom)^2,
force (eV/Angstrom)^2 and stress (eV/Angstrom^3)^2 errors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import (
    AliasChoices, BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
    ValidationError, field_validator,
)

from mfmlip.keys import FLOAT_DTYPES
from mfmlip.model.spec import Architecture

Size = Optional[Union[NonNegativeFloat, NonNegativeInt]]
LABEL_NAMES = ("energy", "forces", "stress")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitConfig(StrictModel):
    """Sizes are fractions (<= 1.0) or counts; ``null`` takes the rest.

    ``file`` gives explicit indices instead (YAML/JSON with train/val/test lists
    of frame numbers in the data file).
    """

    train: Size = None
    val: Size = 0.1
    test: Size = 0.0
    file: Optional[str] = None
    seed: Optional[int] = None


class FilterConfig(StrictModel):
    """Drop frames far from the bulk of the data (see ``mfmlip.data.selection``)."""

    max_energy_above_min_per_atom: Optional[PositiveFloat] = None
    max_abs_force: Optional[PositiveFloat] = None


class FileConfig(StrictModel):
    """One data file; ``path`` is relative to the data root. ``store`` (relative
    to the config file) is the on-disk copy of it that ``mfmlip prepare`` wrote:
    frames are then read from the store, which must come from ``path`` with the
    same reading options (see :mod:`mfmlip.training.stores`)."""

    path: str
    store: Optional[str] = None
    fidelity: Optional[str] = None
    index: str = ":"
    labels: list[Literal["energy", "forces", "stress"]] = list(LABEL_NAMES)  # trained on; test scores all
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str = "stress"
    # how the stress label is stored: "ase" (eV/Angstrom^3, ASE sign, Voigt xx yy zz yz xz xy) or
    # "vasp_kbar" (VASP's kBar, compression positive, order xx yy zz xy yz zx); see mfmlip.data.structures
    stress_format: Literal["ase", "vasp_kbar"] = "ase"
    split: SplitConfig = SplitConfig()
    filter: FilterConfig = FilterConfig()


#: the FileConfig fields that say how frames are read (a store keeps them)
READING_OPTIONS = ("path", "index", "fidelity", "energy_key", "forces_key", "stress_key", "stress_format")


class DataConfig(StrictModel):
    root: Optional[str] = None
    fidelity_key: str = "fidelity"
    allow_missing_labels: bool = True
    files: list[FileConfig] = Field(min_length=1)
    e0: dict[str, dict[str, float]] = {}
    e0_ridge: NonNegativeFloat = 0.0


class ModelConfig(Architecture):
    """The ``model:`` section: the architecture (:class:`mfmlip.model.spec.Architecture`)
    and the training dtype."""

    dtype: Literal[FLOAT_DTYPES] = "float32"


class LossWeights(StrictModel):
    energy: NonNegativeFloat = 1.0
    forces: NonNegativeFloat = 10.0
    stress: NonNegativeFloat = 0.0


class WeightOverride(StrictModel):
    energy: Optional[NonNegativeFloat] = None
    forces: Optional[NonNegativeFloat] = None
    stress: Optional[NonNegativeFloat] = None


class ReplayFile(StrictModel):
    """Structures to replay; their labels are not used. ``path`` is relative to the data root."""

    path: str
    index: str = ":"


class ReplayConfig(StrictModel):
    """``training.replay``: keep a fine-tuned ``init_from`` model close to the original
    at the original's fidelities (:mod:`mfmlip.training.replay`).

    The structures are labelled by the ``init_from`` model itself, before any
    training, at each of ``fidelities`` (default: all of the model's, e.g. PBE
    and R2SCAN for sevenn:7net-mf-0), so no training data of the original is
    needed. ``structures``: ``"training"`` (the geometries of the training
    splits of ``data.files``), ``"ase"`` (ASE's G2 molecules and rattled
    elemental crystals made of the data's elements) or ``"files"``
    (``files``). ``share``: of each epoch's training draws, the rest going to
    the user's data in its own shares (``training.sampling``, else by count).
    Their loss weights are those of their fidelity (``fidelity_weights``).
    ``val``: fraction held out, whose errors against the original
    (``val_energy_mae/<fidelity>``) measure forgetting.
    """

    structures: Literal["training", "ase", "files"] = "training"
    files: list[ReplayFile] = []
    fidelities: Optional[list[str]] = None
    share: float = Field(0.2, gt=0.0, lt=1.0)
    max_structures: PositiveInt = 100
    val: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0


def normalised_shares(shares: dict[str, float]) -> dict[str, float]:
    """``{fidelity: share}`` scaled to sum 1 (``training.sampling``, ``training.stage_two.sampling``)."""
    total = sum(shares.values())
    return {k: s / total for k, s in shares.items()}


class StageTwo(StrictModel):
    """``training.stage_two``: from epoch ``start_epoch`` (0-based) to the end, train with
    other loss weights and sampling shares (the learning rate keeps its schedule).

    The last epochs then weigh the target level more, as MACE's stage two raises the
    energy weight for its last epochs (Batatia et al. 2022, the ``swa`` option). Keys left
    out keep the first stage's values: ``weights`` the base weights, ``fidelity_weights``
    overrides merged into the first stage's per fidelity, ``sampling`` the shares
    (``training.sampling``; empty keeps the first stage's draws). Because the loss
    changes, ``val_loss`` of the two stages does not compare: with a stage two,
    ``training.monitor`` must be a validation error (``val_energy_mae/<fidelity>``).
    """

    start_epoch: PositiveInt
    weights: Optional[WeightOverride] = None
    fidelity_weights: dict[str, WeightOverride] = {}
    sampling: dict[str, PositiveFloat] = {}

    @field_validator("sampling")
    @classmethod
    def _normalised(cls, v):
        return normalised_shares(v)


class TrainingConfig(StrictModel):
    batch_size: PositiveInt = 16
    max_epochs: PositiveInt = 100
    max_steps: Optional[PositiveInt] = None  # optimiser steps; the cosine decay then runs over steps
    max_time_minutes: Optional[PositiveFloat] = None
    # what the cosine decay of the learning rate runs over: max_steps (else max_epochs), or
    # "time": the elapsed share of max_time_minutes (equal-wall-time comparisons, mfmlip study)
    decay_over: Literal["steps", "time"] = "steps"
    val_interval_steps: Optional[PositiveInt] = None  # validate every N steps instead of every epoch
    lr: PositiveFloat = 5e-3
    min_lr_ratio: NonNegativeFloat = 0.01
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: NonNegativeFloat = 0.0
    loss: Literal["mse", "huber"] = "mse"
    huber_delta: PositiveFloat = 0.01
    weights: LossWeights = LossWeights()
    fidelity_weights: dict[str, WeightOverride] = {}
    patience: PositiveInt = 50
    ema_decay: Optional[float] = Field(None, gt=0.0, lt=1.0)
    gradient_clip: Optional[PositiveFloat] = 10.0
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    # training steps through one torch.compile'd graph of energy and forces (mfmlip.model.compiled):
    # minutes to compile, then faster steps; for runs of many steps (docs/benchmarks/compile.md)
    compile: bool = False
    init_from: Optional[str] = None  # model file, or a universal model such as sevenn:7net-mf-0
    # init_from's fidelity that each new fidelity starts as a copy of, or {new: existing} per new fidelity
    new_fidelity_like: Union[str, dict[str, str], None] = None
    replay: Optional[ReplayConfig] = None  # with init_from: replay structures labelled by the original model
    freeze: list[str] = []
    delta_from: Optional[str] = None  # base model file: train a correction to its predictions
    delta_fidelity: Optional[str] = None  # the base model's fidelity to correct (default: its first)
    num_workers: int = Field(0, ge=0)
    # Lightning's accelerator (also accepted as training.accelerator); checked on this machine at train time
    device: Literal["cpu", "cuda", "gpu", "mps", "auto"] = Field(
        "cpu", validation_alias=AliasChoices("device", "accelerator"))
    # processes per node (one per GPU, or CPU processes), nodes, and Lightning's strategy (ddp, ...);
    # batch_size is per process: a step's global batch is batch_size * devices * num_nodes
    devices: Union[PositiveInt, Literal["auto"]] = 1
    num_nodes: PositiveInt = 1
    strategy: str = "auto"
    eval_batch_size: PositiveInt = 64
    # {fidelity: share} of each epoch's training draws (normalised to sum 1; every training
    # fidelity needs one); empty: uniform over structures. See mfmlip.training.sampler.
    sampling: dict[str, PositiveFloat] = {}
    # metric that picks the best checkpoint and drives early stopping (lower is better):
    # "val_loss", or "val_energy_mae/<fidelity>" / "val_forces_mae/<fidelity>" (meV units)
    monitor: str = "val_loss"
    stage_two: Optional[StageTwo] = None

    @field_validator("stage_two")
    @classmethod
    def _stage_two_monitor(cls, v, info):
        if v is None:
            return v
        if info.data.get("monitor", "val_loss") == "val_loss":
            raise ValueError("with a stage two, val_loss of the two stages does not compare: set "
                             "training.monitor to val_energy_mae/<fidelity> or val_forces_mae/<fidelity>")
        if v.start_epoch >= info.data.get("max_epochs", 100):
            raise ValueError(f"start_epoch {v.start_epoch} is not before max_epochs {info.data.get('max_epochs')}")
        return v

    @field_validator("sampling")
    @classmethod
    def _normalised(cls, v):
        return normalised_shares(v)

    @field_validator("decay_over")
    @classmethod
    def _time_to_decay_over(cls, v, info):
        if v == "time" and not info.data.get("max_time_minutes"):
            raise ValueError("decay_over: time needs max_time_minutes")
        return v

    @field_validator("compile")
    @classmethod
    def _batches_to_compile(cls, v, info):
        if v and info.data.get("batch_size", 2) < 2:
            raise ValueError("compile needs batch_size >= 2 (batches of one structure run eagerly)")
        return v

    @field_validator("monitor")
    @classmethod
    def _known_monitor(cls, v):
        if v != "val_loss" and not v.startswith(("val_energy_mae/", "val_forces_mae/")):
            raise ValueError(f"monitor '{v}': use val_loss, val_energy_mae/<fidelity> or val_forces_mae/<fidelity>")
        return v

    def weights_for(self, fidelity: str, stage: int = 1) -> tuple[float, float, float]:
        """(energy, forces, stress) weights of one fidelity in stage 1 or 2 (``stage_two``)."""
        two = self.stage_two if stage == 2 else None
        # later layers override the keys they set: base weights, then per-fidelity overrides
        layers = [self.weights, two and two.weights, self.fidelity_weights.get(fidelity),
                  two and two.fidelity_weights.get(fidelity)]
        out = {}
        for layer in layers:
            out.update({k: getattr(layer, k) for k in LABEL_NAMES if layer is not None and getattr(layer, k) is not None})
        return tuple(out[k] for k in LABEL_NAMES)


class Config(StrictModel):
    seed: int = 0
    output_dir: str = "runs/default"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()

    path: Optional[Path] = Field(None, exclude=True)


def describe_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config.

    Raises
    ------
    ConfigError
        Missing file, invalid YAML, unknown keys, wrong types or bad values;
        every problem is listed with its key path.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, str(path))) from None
    cfg.path = path.resolve()
    return cfg


def _project_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return None


def resolve_data_root(cfg: Config, data_root: str | Path | None = None) -> Path:
    """The folder data paths resolve against.

    Order: ``data_root`` argument (``--data-root``), the ``MFMLIP_DATA``
    environment variable, ``data.root`` in the config (relative to the config
    file), then ``../shared/data`` from the repository root.
    """
    if data_root is not None:
        return Path(data_root)
    if os.environ.get("MFMLIP_DATA"):
        return Path(os.environ["MFMLIP_DATA"])
    base = cfg.path.parent if cfg.path else Path.cwd()
    if cfg.data.root:
        return base / cfg.data.root
    root = _project_root(base) or _project_root(Path.cwd()) or Path.cwd()
    return root.parent / "shared" / "data"


def data_file(root: Path, relative: str) -> Path:
    """``root / relative``, checked.

    Raises
    ------
    ConfigError
        The file does not exist; the message names the path and how the root was set.
    """
    how = "set it with --data-root, the MFMLIP_DATA environment variable, or data.root in the config"
    path = Path(relative) if Path(relative).is_absolute() else root / relative
    if not Path(relative).is_absolute() and not root.is_dir():
        raise ConfigError(f"data root {root} does not exist ({how})")
    if not path.is_file():
        raise ConfigError(f"data file {path} not found (data root {root}; {how})")
    return path
