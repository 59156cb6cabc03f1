"""Argparse ``type=`` functions: each option is checked where it enters, and a
bad value ends in argparse's usage error (exit status 2) naming the option and
the values it accepts."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _number_type(kind, what: str, accept=lambda value: True):
    """An argparse type: ``text`` -> ``kind``, finite, and ``accept(value)``."""

    def parse(text: str):
        value = _number(text, kind, what)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


integer = _number_type(int, "an integer")  # e.g. a seed
positive_int = _number_type(int, "a positive integer (1, 2, ...)", lambda v: v >= 1)  # counts, sizes, intervals
non_negative_int = _number_type(int, "an integer >= 0", lambda v: v >= 0)
finite_float = _number_type(float, "a finite number")  # e.g. a pressure
positive_float = _number_type(float, "a number > 0", lambda v: v > 0)  # cutoffs, time steps, thresholds
non_negative_float = _number_type(float, "a number >= 0", lambda v: v >= 0)  # temperatures, distances


def ase_index(text: str) -> str:
    """An ASE frame index: an integer (``-1`` the last frame) or a slice
    ``start:stop:step`` (``:`` all, ``0:10``, ``::2``); returned as given."""
    parts = text.split(":")
    try:
        numbers = [int(part) if part.strip() else None for part in parts]
    except ValueError:
        numbers = None
    if numbers is None or len(parts) > 3 or (len(parts) == 1 and numbers[0] is None) or numbers[2:] == [0]:
        raise argparse.ArgumentTypeError(
            "expected an ASE index: an integer (-1: the last frame) or a slice start:stop:step such as "
            f"':', '0:10', '::2'; got {text!r}"
        )
    return text


def device(text: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if text == "cpu":  # the default: no need to import torch while parsing
        return text
    accepted = "cpu, cuda, cuda:N or mps"
    kind, _, number = text.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (number and (kind != "cuda" or not number.isdigit())):
        raise argparse.ArgumentTypeError(f"expected a device ({accepted}), got {text!r}")
    from mfmlip.training.checks import device_problem

    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _word_or_count(word: str, what: str):
    """An argparse type: ``word`` as given, or a positive integer (``what`` it counts)."""

    def parse(text: str) -> str | int:
        if text == word:
            return text
        try:
            return positive_int(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected {word!r} or a positive integer, got {text!r}") from None

    parse.__doc__ = f"``{word}`` or a positive number of {what}."
    return parse


devices = _word_or_count("auto", "devices (processes per node)")
pcs = _word_or_count("kaiser", "principal components")
