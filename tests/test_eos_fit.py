"""fit_eos: fits on given energy-volume points; a phase without a minimum keeps its points."""

import numpy as np
import pytest
from ase.units import GPa

from mfmlip.simulation.eos import EOSResult, fit_eos


def birch_murnaghan(v, e0, v0, b0, bp):
    eta = (v0 / v) ** (2.0 / 3.0)
    return e0 + 9.0 * v0 * b0 / 16.0 * ((eta - 1.0) ** 3 * bp + (eta - 1.0) ** 2 * (6.0 - 4.0 * eta))


def test_fit_eos_recovers_a_known_curve():
    volumes = np.linspace(17.5, 23.5, 11)
    result = EOSResult(volumes, birch_murnaghan(volumes, -5.42, 20.4, 88.5 * GPa, 4.2), np.ones(11, bool), n_atoms=2)
    assert fit_eos(result, ["birchmurnaghan"]) is result
    fit = result.fits["birchmurnaghan"]
    assert fit["E0"] == pytest.approx(-5.42, abs=1e-6)
    assert fit["V0"] == pytest.approx(20.4, rel=1e-5)
    assert fit["B"] == pytest.approx(88.5, rel=1e-4)  # GPa


def test_fit_eos_without_minimum_raises_and_keeps_points():
    volumes = np.linspace(12.3, 16.7, 11)
    energies = -4.8 + 0.05 * (volumes - 12.0)  # lowest at the smallest volume, like the fcc phase of a poor model
    result = EOSResult(volumes, energies, np.ones(11, bool), n_atoms=1)
    with pytest.raises(ValueError, match="outside the sampled volumes|fit failed"):
        fit_eos(result, ["birchmurnaghan"])
    assert result.fits == {} and len(result.volumes) == 11
    with pytest.raises(ValueError, match="unknown EOS 'bm'"):
        fit_eos(result, ["bm"])
