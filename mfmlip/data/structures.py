"""Read labelled structures from any ASE-readable file, with checked labels.

Units: positions and cell in Angstrom, energy in eV, forces in eV/Angstrom,
stress in eV/Angstrom^3 (ASE sign convention). A missing or non-finite label is
stored as ``None``/NaN and masked out of the loss; malformed input raises
:class:`DataError` naming the file, frame and field.

Stress labels are read in one of :data:`STRESS_FORMATS`:

* ``"ase"`` (default): eV/Angstrom^3, ASE's sign (``stress = (1/V) dE/d(strain)``,
  negative under compression); a 6-vector is ASE Voigt order xx yy zz yz xz xy.
* ``"vasp_kbar"``: VASP's stress as printed on the OUTCAR ``in kB`` line (and
  stored by e.g. the mlearn benchmark): kBar, VASP's sign (positive under
  compression, the opposite of ASE's); a 6-vector is in VASP's order
  xx yy zz xy yz zx, a 3x3 (vasprun.xml) is taken as is. Converted with
  :func:`stress_from_vasp_kbar`, the same conversion as ASE's own VASP readers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.io.formats import filetype, open_with_compression, string2index
from ase.stress import voigt_6_to_full_3x3_stress
from ase.units import GPa

#: how a stress label is stored in the input; see the module docstring
STRESS_FORMATS = ("ase", "vasp_kbar")
#: VASP's order of the six stress components (OUTCAR "in kB" line): xx yy zz xy yz zx
VASP_STRESS_ORDER = ((0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (2, 0))


class DataError(ValueError):
    """Bad input data; the message names the file, frame and field."""


@dataclass
class Structure:
    """One labelled structure.

    Attributes
    ----------
    positions : (n_atoms, 3) float array, Angstrom
    atomic_numbers : (n_atoms,) int array
    cell : (3, 3) float array, Angstrom (rows are lattice vectors)
    pbc : (3,) bool array
    fidelity : str, the level of theory of the labels
    energy : float, eV; NaN when missing
    forces : (n_atoms, 3) float array in eV/Angstrom, or None when missing
    stress : (3, 3) float array in eV/Angstrom^3, or None when missing
    source : str, ``"file: frame k"`` for error messages
    frame : int, index of the frame in its file (-1 when not from a file)
    """

    positions: np.ndarray
    atomic_numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    fidelity: str
    energy: float = float("nan")
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    source: str = "<memory>"
    frame: int = -1

    @property
    def n_atoms(self) -> int:
        return len(self.atomic_numbers)


def _raw_label(atoms: Atoms, key: str):
    """Look a label up in the attached calculator, then ``info``, then ``arrays``."""
    calc = getattr(atoms, "calc", None)
    if calc is not None and key in getattr(calc, "results", {}):
        return calc.results[key]
    if key in atoms.info:
        return atoms.info[key]
    if key in atoms.arrays:
        return atoms.arrays[key]
    return None


def stress_from_vasp_kbar(value, where: str = "stress") -> np.ndarray:
    """VASP stress in kBar, VASP sign -> (3, 3) stress in eV/Angstrom^3, ASE sign.

    ``value`` is 6 numbers in VASP's order xx yy zz xy yz zx (the OUTCAR
    ``in kB`` line) or a 3x3 matrix (vasprun.xml). The result is
    ``-0.1 * GPa * value`` as a symmetric 3x3 (1 kBar = 0.1 GPa; VASP reports
    compression as positive, ASE as negative), as ASE's VASP readers do.

    Raises
    ------
    DataError
        Not numeric, or neither 6 nor 9 numbers; the message starts with ``where``.
    """
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: not numeric ({err})") from None
    if arr.size == 6:
        full = np.empty((3, 3))
        for (i, j), v in zip(VASP_STRESS_ORDER, arr.ravel()):
            full[i, j] = full[j, i] = v
    elif arr.size == 9:
        full = arr.reshape(3, 3)
    else:
        raise DataError(
            f"{where}: expected VASP stress in kBar as 6 numbers (xx yy zz xy yz zx) or a 3x3 matrix, "
            f"got shape {arr.shape}"
        )
    return -0.1 * GPa * full


def _checked(value, shape, where: str, allow_missing: bool, voigt: bool = False, per_atom: bool = False):
    """Return ``value`` as a float array of ``shape``, or None when missing.

    With ``voigt``, a 6-vector is read as Voigt stress (xx, yy, zz, yz, xz, xy).
    ``per_atom`` (forces) only words the error message.
    """
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: not numeric ({err})") from None
    if voigt and arr.size == 6:
        arr = voigt_6_to_full_3x3_stress(arr)
    if arr.shape != shape and arr.size == np.prod(shape):
        arr = arr.reshape(shape)
    if arr.shape != shape:
        raise DataError(f"{where}: expected shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        if not allow_missing:
            raise DataError(
                f"{where}: contains NaN or inf{_first_bad(arr, per_atom)} "
                "(set allow_missing_labels: true to mask it)"
            )
        return None
    return arr


def _first_bad(arr: np.ndarray, per_atom: bool = False) -> str:
    """`` (first at atom 1, component y: nan)`` for the first non-finite entry."""
    if arr.ndim == 0:
        return f" ({float(arr)})"
    where = tuple(int(k) for k in np.argwhere(~np.isfinite(arr))[0])
    if per_atom:
        return f" (first at atom {where[0]}, component {'xyz'[where[1]]}: {float(arr[where])})"
    return f" (first at index {where}: {float(arr[where])})"


def structure_from_atoms(
    atoms: Atoms,
    *,
    fidelity: str | None = None,
    fidelity_key: str = "fidelity",
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    stress_format: str = "ase",
    allow_missing_labels: bool = True,
    source: str = "<memory>",
    frame: int = -1,
) -> Structure:
    """Convert one ``ase.Atoms`` with labels into a :class:`Structure`.

    The fidelity is ``fidelity`` if given, else ``atoms.info[fidelity_key]``.
    ``stress_format`` (one of :data:`STRESS_FORMATS`) says how the label under
    ``stress_key`` is stored; it is converted to eV/Angstrom^3, ASE sign.

    Raises
    ------
    ValueError
        Unknown ``stress_format``.
    DataError
        No fidelity, non-finite positions or cell, a label of the wrong shape,
        or a non-finite label when ``allow_missing_labels`` is False.
    """
    if stress_format not in STRESS_FORMATS:
        raise ValueError(f"unknown stress_format {stress_format!r}; choose from {list(STRESS_FORMATS)}")
    n = len(atoms)
    if n == 0:
        raise DataError(f"{source}: structure has no atoms")
    fid = fidelity if fidelity is not None else atoms.info.get(fidelity_key)
    if fid is None:
        raise DataError(
            f"{source}: no fidelity: info['{fidelity_key}'] is missing and the "
            "config entry of this file gives none"
        )
    positions = atoms.get_positions()
    if not np.all(np.isfinite(positions)):
        raise DataError(f"{source}, field 'positions': contains NaN or inf{_first_bad(positions, True)}")
    cell = np.asarray(atoms.get_cell())
    if not np.all(np.isfinite(cell)):
        raise DataError(f"{source}, field 'cell': contains NaN or inf")
    energy = _checked(
        _raw_label(atoms, energy_key), (), f"{source}, field '{energy_key}'", allow_missing_labels
    )
    forces = _checked(
        _raw_label(atoms, forces_key), (n, 3), f"{source}, field '{forces_key}'", allow_missing_labels,
        per_atom=True,
    )
    raw_stress = _raw_label(atoms, stress_key)
    if stress_format == "vasp_kbar" and raw_stress is not None:
        raw_stress = stress_from_vasp_kbar(raw_stress, f"{source}, field '{stress_key}'")
    stress = _checked(
        raw_stress, (3, 3), f"{source}, field '{stress_key}'", allow_missing_labels, voigt=True,
    )
    return Structure(
        positions=positions,
        atomic_numbers=atoms.get_atomic_numbers().astype(np.int64),
        cell=cell,
        pbc=np.asarray(atoms.get_pbc(), dtype=bool),
        fidelity=str(fid),
        energy=float("nan") if energy is None else float(energy),
        forces=forces,
        stress=stress,
        source=source,
        frame=frame,
    )


def read_frames(path: Path, index: str) -> tuple[list[Atoms], range]:
    """Frames an ASE index string selects, with their frame numbers in the file.

    Forward slices are read lazily by ASE; negative or reversed selections read
    the whole file so that the frame numbers are exact.
    """
    sel = string2index(index)
    if isinstance(sel, int):
        sel = slice(sel, sel + 1 if sel != -1 else None)
    step = sel.step or 1
    if step > 0 and (sel.start or 0) >= 0 and (sel.stop is None or sel.stop >= 0):
        frames = ase.io.read(path, index=sel)
        start = sel.start or 0
        return frames, range(start, start + len(frames) * step, step)
    every = ase.io.read(path, index=":")
    numbers = range(len(every))[sel]
    return [every[k] for k in numbers], numbers


XYZ_FORMATS = ("xyz", "extxyz")


def _file_format(path: Path) -> str | None:
    try:
        return filetype(str(path))
    except Exception:  # unknown or unreadable: ASE's own error is reported later
        return None


def _frames_needed(index: str) -> int | None:
    """How many frames from the start of the file an index needs (None: all)."""
    sel = string2index(index)
    if isinstance(sel, int):
        return sel + 1 if sel >= 0 else None
    if (sel.step or 1) > 0 and (sel.start or 0) >= 0 and sel.stop is not None and sel.stop >= 0:
        return sel.stop
    return None


def _xyz_layout(path: Path, needed: int | None = None) -> tuple[list[tuple[int, int]], str | None]:
    """Scan an (ext)xyz file as ASE does: the first and last line (1-based) of
    each of its first ``needed`` frames (all when None), and a description of
    the first structural problem among them, if any.

    Problems found: a header that is not an atom count, a frame that ends
    before its atoms do, and text after a blank line (ASE stops reading at a
    blank line and would silently ignore the rest of the file).
    """
    with open_with_compression(str(path), "r") as fh:
        lines = fh.read().splitlines()
    frames: list[tuple[int, int]] = []
    n = 0
    while n < len(lines) and (needed is None or len(frames) < needed):
        header = lines[n].strip()
        where = f"frame {len(frames)} (line {n + 1})"
        if not header:
            rest = next((m for m in range(n, len(lines)) if lines[m].strip()), None)
            if rest is None:
                break
            return frames, (
                f"{where}: blank line where a frame should start, but the file goes on at line "
                f"{rest + 1}; ASE would stop reading here and silently ignore the rest"
            )
        try:
            natoms = int(header)
        except ValueError:
            return frames, _count_too_small(lines, frames, n) or (
                f"{where}: expected the number of atoms of a frame, got {header[:60]!r}"
            )
        if natoms < 0:
            return frames, f"{where}: negative number of atoms {natoms}"
        body = lines[n + 2 : n + 2 + natoms]
        header_in_body = next((k for k, line in enumerate(body) if _is_count(line)), None)
        if header_in_body is not None:
            return frames, (
                f"{where} declares {natoms} atoms but has {header_in_body} atom lines: line "
                f"{n + 3 + header_in_body} ({body[header_in_body].strip()!r}) starts the next frame"
            )
        blank = next((k for k, line in enumerate(body) if not line.strip()), None)
        if n + 1 >= len(lines) or len(body) < natoms or blank is not None:
            got = len(body) if blank is None else blank
            end = "the end of the file" if blank is None else f"a blank line (line {n + 3 + blank})"
            return frames, f"{where} is truncated: {got} of its {natoms} atom lines before {end}"
        last = n + 1 + natoms  # 0-based index of the last atom line
        while last + 1 < len(lines) and lines[last + 1].lstrip().startswith("VEC"):
            last += 1
        frames.append((n + 1, last + 1))
        n = last + 1
    return frames, None


def _is_count(line: str) -> bool:
    """A line holding one integer only: a frame header, never an atom line."""
    return line.strip().isdigit()


def _count_too_small(lines: list[str], frames: list[tuple[int, int]], n: int) -> str | None:
    """The frame before line ``n`` (0-based) declares too few atoms if line
    ``n``, where a header should be, looks like that frame's atom lines."""
    if not frames:
        return None
    first, last = frames[-1]
    columns = len(lines[last - 1].split())
    extra = 0
    while n + extra < len(lines) and len(lines[n + extra].split()) == columns and not _is_count(lines[n + extra]):
        extra += 1
    if not extra:
        return None
    declared = last - first - 1
    return (
        f"frame {len(frames) - 1} (line {first}) declares {declared} atoms but has at least "
        f"{declared + extra}: line {n + 1} is an atom line where frame {len(frames)} should start"
    )


def _locate_read_error(path: Path, index: str, err: Exception, layout) -> str:
    """Which frame ASE failed on: read the selection again one frame at a time."""
    sel = string2index(index)
    if isinstance(sel, int) or (sel.step or 1) < 0 or (sel.start or 0) < 0:
        sel = slice(None)  # count from the start of the file
    start, step = sel.start or 0, sel.step or 1
    done = 0
    try:
        for _ in ase.io.iread(path, index=sel):
            done += 1
    except Exception:
        frame = start + done * step
        lines = f" (lines {layout[frame][0]}-{layout[frame][1]})" if layout and frame < len(layout) else ""
        return f"frame {frame}{lines}: {type(err).__name__}: {err}"
    return f"{type(err).__name__}: {err}"


def read_structures(path: str | Path, index: str = ":", **kwargs) -> list[Structure]:
    """Read every frame of an ASE-readable file (extended XYZ first-class).

    Parameters
    ----------
    path : file to read; the format is guessed by ASE from its name.
    index : ASE index string, e.g. ``":"`` or ``"0:100"``.
    **kwargs : passed to :func:`structure_from_atoms` (``fidelity``,
        ``fidelity_key``, ``energy_key``, ``forces_key``, ``stress_key``,
        ``stress_format``, ``allow_missing_labels``).

    Returns
    -------
    list of :class:`Structure`, in file order.

    Raises
    ------
    DataError
        The file is missing, empty or unreadable (the message names the frame
        and, for (ext)xyz, the line), or a frame is bad.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes): no structures to read")
    layout = None
    if _file_format(path) in XYZ_FORMATS:
        layout, problem = _xyz_layout(path, _frames_needed(index))
        if problem:
            raise DataError(f"{path}: cannot be read: {problem}")
    try:
        frames, numbers = read_frames(path, index)
    except Exception as err:  # ASE raises many types for malformed files
        where = _locate_read_error(path, index, err, layout)
        raise DataError(f"{path}: cannot be read by ASE: {where}") from None
    if not frames:
        raise DataError(f"{path}: contains no structures" + (f" at index {index!r}" if index != ":" else ""))
    return [
        structure_from_atoms(atoms, source=f"{path}: frame {k}", frame=k, **kwargs)
        for k, atoms in zip(numbers, frames)
    ]


def iter_structures(path: str | Path, index: str = ":", **kwargs) -> Iterator[Structure]:
    """The frames of :func:`read_structures`, one at a time (memory bounded: for
    files larger than memory, e.g. by ``mfmlip prepare``).

    The file is not checked as a whole first; a frame ASE cannot parse raises
    when it is reached.

    Raises
    ------
    DataError
        The file is missing, empty or contains no selected frame, or a frame is
        unreadable or bad (the message names the file and the frame).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes): no structures to read")
    sel = string2index(index)
    if isinstance(sel, int):
        sel = slice(sel, sel + 1 if sel != -1 else None)
    if (sel.step or 1) < 0 or (sel.start or 0) < 0 or (sel.stop is not None and sel.stop < 0):
        yield from read_structures(path, index, **kwargs)  # counted from the end: ASE reads it all anyway
        return
    start, step, count = sel.start or 0, sel.step or 1, 0
    frames = ase.io.iread(path, index=sel)
    while True:
        k = start + count * step
        try:
            atoms = next(frames)
        except StopIteration:
            break
        except Exception as err:  # ASE raises many types for malformed files
            raise DataError(f"{path}: cannot be read by ASE: frame {k}: {type(err).__name__}: {err}") from None
        yield structure_from_atoms(atoms, source=f"{path}: frame {k}", frame=k, **kwargs)
        count += 1
    if not count:
        raise DataError(f"{path}: contains no structures" + (f" at index {index!r}" if index != ":" else ""))


def frame_keys(path: str | Path, index: str = ":") -> list[str]:
    """Names of the labels and arrays the first selected frame of ``path`` carries.

    The union of its calculator results, ``info`` and ``arrays`` keys (without
    ``numbers`` and ``positions``), sorted: what a label key can name.
    """
    sel = string2index(index)
    first = sel if isinstance(sel, int) else (sel.start or 0) if (sel.step or 1) > 0 else -1
    atoms = ase.io.read(path, index=first) if first >= 0 else read_frames(Path(path), index)[0][0]
    calc = getattr(atoms, "calc", None)
    names = set(getattr(calc, "results", {})) | set(atoms.info) | set(atoms.arrays)
    return sorted(names - {"numbers", "positions"})


def unlabelled_structure(atoms: Atoms, source: str = "<memory>", frame: int = -1) -> Structure:
    """An unlabelled :class:`Structure` of ``atoms`` (labels and fidelity ignored).

    Raises
    ------
    DataError
        No atoms, or non-finite positions or cell; the message names ``source``.
    """
    if len(atoms) == 0:
        raise DataError(f"{source}: structure has no atoms")
    s = Structure(
        positions=np.asarray(atoms.positions, dtype=np.float64),
        atomic_numbers=atoms.get_atomic_numbers().astype(np.int64),
        cell=np.asarray(atoms.cell.array, dtype=np.float64),
        pbc=np.asarray(atoms.pbc, dtype=bool),
        fidelity="",
        source=source,
        frame=frame,
    )
    for name in ("positions", "cell"):
        if not np.all(np.isfinite(getattr(s, name))):
            raise DataError(f"{source}, field '{name}': contains NaN or inf")
    return s
