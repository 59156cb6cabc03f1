"""Data-efficiency studies: every fidelity scheme and baseline against the
amount of high-level data, on the same held-out test set (``mfmlip study``)."""

from mfmlip.study.config import METHODS, StudyConfig, load_study
from mfmlip.study.runner import run_study

__all__ = ["METHODS", "StudyConfig", "load_study", "run_study"]
