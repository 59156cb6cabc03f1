"""The study configuration: data, grid, budget, and the ``--quick`` reduction.

A study trains every method of ``grid.methods`` on a growing share of the
high-level data (``grid.fractions`` of the pool) for every seed, and scores
each run on the same held-out high-level test structures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import (
    Field, PositiveInt, ValidationError, confloat, model_validator,
)

from mfmlip.model.fidelity import SCHEMES
from mfmlip.training.config import (
    ConfigError, FileConfig, ModelConfig, ReplayConfig, StrictModel, TrainingConfig, describe_validation_error,
)

SINGLE, TRANSFER, DELTA, FOUNDATION = "single_fidelity", "transfer", "delta", "foundation"
DEFAULT_METHODS = (*sorted(SCHEMES), SINGLE, TRANSFER, DELTA)
# foundation fine-tunes a universal model (options.foundation), ~18x the cost of a default run: asked for by name
METHODS = (*DEFAULT_METHODS, FOUNDATION)
Method = Literal[METHODS]  # type: ignore[valid-type]
Fraction = confloat(gt=0.0, le=1.0)
Selection = Literal["random", "direct", "narrow"]


class StudyData(StrictModel):
    """The high level (scored) and the low levels (training help only).

    Units: ``filter`` thresholds in eV/atom and eV/Angstrom as in training.
    """

    root: Optional[str] = None
    fidelity_key: str = "fidelity"
    allow_missing_labels: bool = True
    high: FileConfig
    low: list[FileConfig] = Field(min_length=1)
    test: Union[PositiveInt, Fraction] = 0.1  # held-out high-level structures: count or fraction
    pool: Optional[PositiveInt] = None  # cap on the high-level training pool the fractions refer to
    val_fraction: Fraction = 0.1  # of each run's high-level structures, used for validation
    low_val: Fraction = 0.05  # of the low-level structures, used for validation
    low_max: Optional[PositiveInt] = None  # cap on the low-level structures per file
    split_seed: int = 0  # draws the test set and the pool, the same for every run


class Grid(StrictModel):
    methods: list[Method] = Field(default_factory=lambda: list(DEFAULT_METHODS), min_length=1)
    fractions: list[Fraction] = Field(default_factory=lambda: [0.05, 0.1, 0.25, 0.5, 0.8], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    selections: list[Selection] = Field(default_factory=lambda: ["random"], min_length=1)


class MethodOptions(StrictModel):
    """Settings of the baselines.

    ``low_scheme``: fidelity scheme of the low-level model that ``transfer``
    starts from and ``delta`` corrects (it matters only with several low levels).
    ``base_fidelity``: the low level that ``transfer`` copies for the new
    fidelity and ``delta`` corrects; default the first ``data.low`` file's.
    ``transfer_freeze``: modules kept fixed while fine-tuning (Ko & Ong 2025
    froze the element embedding).
    ``narrow_share``: ``narrow`` selection picks at random among the pool
    structures of lowest PC1 score, a region holding this share of the pool
    (or the n structures asked for, if more).
    ``direct``: options of :func:`mfmlip.sampling.direct_select` (k, pick, ...).
    ``foundation``: the universal model that the ``foundation`` method fine-tunes
    (``training.init_from``) on the high level, with the low levels as extra
    fidelities; ``foundation_like``, ``foundation_freeze`` and
    ``foundation_replay``: its ``new_fidelity_like``, ``freeze`` and ``replay``.
    """

    low_scheme: str = "one_hot_linear"
    base_fidelity: Optional[str] = None
    transfer_freeze: list[str] = ["embedding"]
    narrow_share: Fraction = 0.2
    direct: dict = {}
    foundation: str = "sevenn:7net-mf-0"
    foundation_like: Optional[str] = None
    foundation_freeze: list[str] = []
    foundation_replay: Optional[ReplayConfig] = None


class Quick(StrictModel):
    """What ``--quick`` replaces, for a smoke test in minutes."""

    methods: Optional[list[Method]] = None
    fractions: Optional[list[Fraction]] = None
    seeds: Optional[list[int]] = None
    selections: Optional[list[Selection]] = None
    test: Optional[Union[PositiveInt, Fraction]] = None
    pool: Optional[PositiveInt] = None
    low_max: Optional[PositiveInt] = None
    max_steps: Optional[PositiveInt] = None


class StudyConfig(StrictModel):
    """``training.max_steps`` is the budget of every run: the same number of
    optimiser steps per grid cell; ``transfer`` and ``delta`` spend half on
    the low-level model (trained once per seed) and half on the high level.
    With ``training.max_time_minutes`` the budget is also wall time, split
    the same way (equal wall time per cell: set ``max_steps`` high enough not
    to bind, and ``decay_over: time`` so that each run's learning rate decays
    over its own minutes)."""

    name: str
    output_dir: Optional[str] = None  # default runs/studies/<name>
    jobs: Optional[PositiveInt] = None  # runs at once; default one per CPU core
    data: StudyData
    grid: Grid = Grid()
    options: MethodOptions = MethodOptions()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig
    quick: Quick = Quick()

    path: Optional[Path] = Field(None, exclude=True)

    @model_validator(mode="after")
    def _budget(self):
        if not self.training.max_steps:
            raise ValueError("training.max_steps is required: the fixed budget of every run")
        if self.options.low_scheme not in SCHEMES:
            raise ValueError(f"options.low_scheme: unknown scheme {self.options.low_scheme!r}")
        return self

    def reduced(self) -> StudyConfig:
        """The ``--quick`` variant, written to ``<output_dir>_quick``."""
        q = self.quick
        grid = {k: getattr(q, k) or getattr(self.grid, k) for k in ("methods", "fractions", "seeds", "selections")}
        data = {k: getattr(q, k) or getattr(self.data, k) for k in ("test", "pool", "low_max")}
        training = {"max_steps": q.max_steps or self.training.max_steps}
        out = self.model_copy(update={
            "output_dir": f"{self.results_dir()}_quick",
            "grid": self.grid.model_copy(update=grid),
            "data": self.data.model_copy(update=data),
            "training": self.training.model_copy(update=training),
        })
        out.path = self.path
        return out

    def results_dir(self) -> Path:
        return Path(self.output_dir or f"runs/studies/{self.name}")


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML.

    Raises
    ------
    ConfigError
        Missing file, invalid YAML, unknown keys or bad values, listed with their key paths.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
        cfg = StudyConfig.model_validate(raw if isinstance(raw, dict) else {})
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, str(path))) from None
    cfg.path = path.resolve()
    return cfg
