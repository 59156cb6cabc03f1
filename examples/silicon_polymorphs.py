"""Equations of state of four silicon polymorphs with a trained mfmlip model.

Usage: python examples/silicon_polymorphs.py runs/silicon/model.pt PBE [OUT_DIR]

Builds diamond, beta-Sn, simple hexagonal (sh) and fcc Si with ASE near their
PBE equilibrium volumes, fits Murnaghan and Birch-Murnaghan equations of state
(volumes 0.85-1.15 of the start, positions relaxed at each volume) and prints
E0 (eV/atom), V0 (Angstrom^3/atom) and B (GPa) plus the beta-Sn - diamond
energy difference. Writes OUT_DIR/eos_<name>.png and OUT_DIR/eos_silicon.json.
"""

import json
import sys
from pathlib import Path

from ase import Atoms
from ase.build import bulk
from ase.spacegroup import crystal

from mfmlip import MFCalculator
from mfmlip.simulation.eos import equation_of_state


def polymorphs() -> dict[str, Atoms]:
    return {
        "diamond": bulk("Si", "diamond", a=5.47),
        "beta-Sn": crystal("Si", [(0, 0, 0)], spacegroup=141, cellpar=[4.83, 4.83, 2.66, 90, 90, 90]),
        "sh": Atoms("Si", cell=[[2.64, 0, 0], [-1.32, 2.2863, 0], [0, 0, 2.48]], pbc=True),
        "fcc": bulk("Si", "fcc", a=3.87),
    }


def main(model: str, fidelity: str, out: str = "eos_silicon") -> dict:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    calc = MFCalculator(model, fidelity=fidelity, dtype="float64")
    table = {}
    for name, atoms in polymorphs().items():
        try:
            result = equation_of_state(atoms, calc, points=11, volume_range=(0.85, 1.15), plot=out_dir / f"eos_{name}.png")
        except ValueError as err:  # no minimum in range: the model extrapolates badly here
            print(f"{name:8s} no fit: {err}")
            continue
        table[name] = result.fits
        m = result.fits["murnaghan"]
        print(f"{name:8s} Murnaghan E0 {m['E0']:9.4f} eV/atom  V0 {m['V0']:7.3f} A^3/atom  B {m['B']:6.1f} GPa")
    gap = None
    if "beta-Sn" in table and "diamond" in table:
        gap = table["beta-Sn"]["murnaghan"]["E0"] - table["diamond"]["murnaghan"]["E0"]
        print(f"E(beta-Sn) - E(diamond) = {gap:.3f} eV/atom")
    (out_dir / "eos_silicon.json").write_text(json.dumps({"fits": table, "beta_sn_minus_diamond_eV": gap}, indent=2))
    return table


if __name__ == "__main__":
    main(*sys.argv[1:])
