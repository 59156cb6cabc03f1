"""Running a user's LAMMPS input script with an mfmlip model as the interaction.

The input is the user's own (``units metal``, a box from ``read_data``,
``create_box`` or ``read_restart``, then any fixes, computes and runs) with
no ``pair_style`` (or ``pair_style zero``). :func:`run_input` executes its
commands one at a time until the box exists, adds the model's ``fix
external`` (:class:`~mfmlip.lammps.driver.MFFixExternal`) there, and hands
the rest of the file to LAMMPS as a file, so that loops (``label`` /
``jump SELF``), ``include`` and variables work as in ``lmp -in``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mfmlip.data.graph import MIN_DISTANCE
from mfmlip.data.structures import DataError
from mfmlip.lammps.driver import MFFixExternal, check_elements
from mfmlip.lammps.library import open_lammps
from mfmlip.model.inference import resolve_model


def read_input(path: str | Path) -> list[tuple[int, str]]:
    """``(first line number, command)`` of each command of a LAMMPS input file,
    continuation lines (ending in ``&``) joined."""
    commands, pending, first = [], "", 1
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        first = number if not pending else first
        if line.rstrip().endswith("&"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append((first, pending + line))
        pending = ""
    if pending:
        commands.append((first, pending))
    return commands


def run_input(path: str | Path, model, fidelity: str | None, elements=None, device: str | torch.device = "cpu",
              dtype=None, min_distance: float = MIN_DISTANCE, log: str | None = "log.lammps", screen: bool = True,
              variables: dict | None = None) -> MFFixExternal:
    """Run the LAMMPS input script ``path`` with ``model`` at ``fidelity``.

    Parameters
    ----------
    path : LAMMPS input file, ``units metal``, without a pair style.
    model : model file path or :class:`~mfmlip.model.interface.Potential`.
    fidelity : the level of theory; required.
    elements : element of each atom type in type order, e.g. ``["O", "H"]``;
        default: from the type masses in the data file.
    device, dtype, min_distance : as :class:`~mfmlip.model.inference.Predictor`.
    log : LAMMPS log file (``None``: none); ``screen`` whether LAMMPS prints.
    variables : ``{name: value}``, as ``lmp -var name value``.

    Returns
    -------
    The fix (its ``calls``: model evaluations). The LAMMPS instance is closed.

    Raises
    ------
    FileNotFoundError
        No input file.
    ValueError
        Missing or unknown fidelity, an element the model does not know, more
        than one MPI rank, units other than metal, an input that never makes a
        box, or a LAMMPS error (the message is LAMMPS's, with the file).
    DataError
        An atom type without an element, or atoms closer than
        ``min_distance`` during the run (the run stops at that step).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LAMMPS input file {path} not found")
    resolved = resolve_model(model, device, dtype)
    resolved.fidelity_index(fidelity)  # before LAMMPS starts
    if elements is not None:
        check_elements(elements, resolved.species)
    commands = read_input(path)
    lmp = open_lammps(log, screen, variables)
    try:
        return _run(lmp, path, commands, resolved, fidelity, elements, device, min_distance)
    finally:
        lmp.close()


def _run(lmp, path: Path, commands: list, model, fidelity, elements, device, min_distance) -> MFFixExternal:
    """Commands one by one until the box exists, the fix, then the rest as a file."""
    for done, (line_number, command) in enumerate(commands, start=1):
        _lammps(lmp.command, command, f"{path}, line {line_number}")
        if lmp.extract_setting("box_exist"):
            break
    else:
        raise ValueError(f"{path}: no command made a simulation box (read_data, create_box or read_restart)")
    try:
        fix = MFFixExternal(lmp, model, fidelity, elements, device, min_distance=min_distance)
    except (ValueError, DataError) as err:
        raise type(err)(f"{path}: {err}") from None
    with tempfile.TemporaryDirectory() as tmp:
        rest = Path(tmp) / path.name
        rest.write_text("".join(f"{command}\n" for _, command in commands[done:]))
        _lammps(lmp.file, str(rest), f"{path}, after line {line_number}", fix)
    return fix


def _lammps(call, argument: str, where: str, fix: MFFixExternal | None = None) -> None:
    """``call(argument)``, with a LAMMPS error (or the model's, that stopped it) as a ValueError naming ``where``."""
    try:
        call(argument)
    except Exception as err:  # the lammps module raises plain Exception
        if fix is not None and fix.error is not None:
            raise fix.error
        raise ValueError(f"{where}: LAMMPS: {str(err).strip()}") from None
