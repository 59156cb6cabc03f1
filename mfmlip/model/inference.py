"""The one inference path: resolve a model, bind a fidelity, predict batches of structures.

Evaluation, the delta base subtraction, the DIRECT encoder, the ASE
calculator and the torch-sim model all predict through :class:`Predictor`.

Units: energy eV, forces eV/Angstrom, stress eV/Angstrom^3 (ASE sign).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from ase import Atoms

from mfmlip import keys as K
from mfmlip.data.graph import MIN_DISTANCE, collate, structure_to_graph, to_device
from mfmlip.data.structures import Structure, unlabelled_structure
from mfmlip.model.interface import Potential
from mfmlip.model.serialization import load_model

DTYPES = {name: getattr(torch, name) for name in K.FLOAT_DTYPES}
# Batches of fewer atoms run on one intra-op thread: the threads' synchronisation
# costs more than they share, and collapses when another process holds a core
# (docs/benchmarks/threads.md).
SMALL_BATCH_ATOMS = 100


def threads_for(n_atoms: int, threads: int | None = None) -> int:
    """Intra-op threads for a batch of ``n_atoms`` atoms: ``threads`` if given,
    else 1 below :data:`SMALL_BATCH_ATOMS` atoms and torch's setting above."""
    if threads is not None:
        return int(threads)
    return 1 if n_atoms < SMALL_BATCH_ATOMS else torch.get_num_threads()


def check_threads(threads: int | None) -> int | None:
    """``threads`` (intra-op threads per call, or None for :func:`threads_for`'s rule), checked.

    Raises
    ------
    ValueError
        ``threads`` below 1.
    """
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1 or None (automatic), got {threads}")
    return threads


@contextlib.contextmanager
def intra_op_threads(n: int):
    """``torch.set_num_threads(n)`` for the block, then back."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


def resolve_dtype(dtype) -> torch.dtype | None:
    """``None``, ``"float32"``/``"float64"`` (also ``"torch.float64"``) or a torch dtype -> torch dtype.

    Raises
    ------
    ValueError
        Any other value; the message lists the accepted ones (float16 and
        bfloat16 are refused: forces and stress would be silently imprecise).
    """
    if dtype is None or dtype in DTYPES.values():
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_model(model: str | Path | Potential, device: str | torch.device = "cpu", dtype=None) -> Potential:
    """A model file, a SevenNet name such as ``"sevenn:7net-mf-0"``
    (:mod:`mfmlip.model.sevennet`) or a module, on ``device`` in eval mode.

    ``dtype`` default: a module keeps its own, a model file or name loads as float32.

    Raises
    ------
    FileNotFoundError, ModelFileError
        As :func:`mfmlip.model.serialization.load_model`.
    ValueError
        An unsupported dtype.
    TypeError
        Neither a path, a name nor a :class:`Potential`.
    """
    torch_dtype = resolve_dtype(dtype)
    if isinstance(model, Potential):
        return model.to(device=device, dtype=torch_dtype or model.dtype).eval()
    if isinstance(model, (str, Path)):
        return load_model(model, device=device, dtype=torch_dtype or torch.float32)
    raise TypeError(f"model must be a model file path or an mfmlip Potential, got {type(model).__name__}")


class Predictor:
    """A model bound to one fidelity, predicting structures batch by batch.

    Parameters
    ----------
    model : model file path or :class:`~mfmlip.model.interface.Potential`
        (see :func:`resolve_model`).
    fidelity : the level of theory to reproduce; required.
    device : torch device of the model and batches.
    dtype : ``"float32"``, ``"float64"`` or a torch dtype; default as :func:`resolve_model`.
    min_distance : Angstrom; structures with two atoms closer are refused.
    threads : intra-op threads per call; default :func:`threads_for` (one for
        batches under :data:`SMALL_BATCH_ATOMS` atoms, torch's setting above).

    Raises
    ------
    ValueError
        Missing or unknown fidelity (the message lists the model's ones), an
        unsupported dtype, or ``threads`` below 1.

    Examples
    --------
    >>> from ase.build import molecule
    >>> from mfmlip.model import MFPotential, ModelSpec
    >>> model = MFPotential(ModelSpec(species=[1, 8], fidelities=["PBE", "MP2"], channels=8, num_layers=1))
    >>> p = Predictor(model, "MP2")
    >>> out = p(p.batch([molecule("H2O")]))
    >>> out["energy"].shape, out["forces"].shape
    (torch.Size([1]), torch.Size([3, 3]))
    """

    def __init__(self, model, fidelity: str | None, device: str | torch.device = "cpu", dtype=None,
                 min_distance: float = MIN_DISTANCE, threads: int | None = None):
        self.model = resolve_model(model, device, dtype)
        self.device, self.min_distance = torch.device(device), float(min_distance)
        self.set_fidelity(fidelity)
        self.threads = check_threads(threads)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def set_fidelity(self, name: str | None) -> None:
        """Bind another fidelity (checked: :meth:`Potential.fidelity_index`)."""
        self.fidelity_index = self.model.fidelity_index(name)
        self.fidelity = name

    def to(self, device=None, dtype=None) -> "Predictor":
        """Move the model to another device and/or dtype."""
        device = self.device if device is None else torch.device(device)
        self.model = resolve_model(self.model, device, dtype)
        self.device = device
        return self

    def batch(self, items: Sequence[Structure | Atoms]) -> dict:
        """One batch of structures (or ``ase.Atoms``) at the bound fidelity, on the
        model's device and dtype; labels of structures are kept (masked where missing).

        Raises
        ------
        DataError
            Non-finite coordinates, a periodic cell of zero volume, or atoms
            closer than ``min_distance``.
        """
        structures = [s if isinstance(s, Structure) else unlabelled_structure(
            s, source=f"structure {s.get_chemical_formula()}") for s in items]
        graphs = [structure_to_graph(s, self.model.cutoff, self.fidelity_index, self.min_distance)
                  for s in structures]
        return to_device(collate(graphs), self.device, self.model.dtype)

    def __call__(self, batch: dict, forces: bool = True, stress: bool = False) -> dict:
        """Predict one batch: ``energy`` (n_graphs,), ``atomic_energy`` (n_atoms,),
        ``node_features`` (n_atoms, dim), ``forces`` (n_atoms, 3) and ``stress``
        (n_graphs, 3, 3) when asked; detached.

        Raises
        ------
        ValueError
            An element the model does not know.
        """
        with intra_op_threads(threads_for(batch[K.POSITIONS].shape[0], self.threads)):
            if forces or stress:
                out = self.model(batch, compute_forces=forces, compute_stress=stress)
            else:
                with torch.inference_mode():  # not no_grad: the model's forward would re-enable it
                    out = self.model(batch, compute_forces=False)
        return {k: v.detach() for k, v in out.items()}

    def predict(self, structures: Sequence[Structure], batch_size: int = 64, max_atoms: int | None = None,
                forces: bool = True, stress: bool = False) -> Iterator[tuple[list, dict, dict]]:
        """Yield ``(structures, batch, prediction)`` chunk by chunk (at most
        ``batch_size`` structures and, unless one structure is larger,
        ``max_atoms`` atoms each); prediction as :meth:`__call__`.

        Raises
        ------
        ValueError
            ``batch_size`` or ``max_atoms`` below 1, or an unknown element
            (named with the structures of the chunk).
        """
        if batch_size < 1 or (max_atoms is not None and max_atoms < 1):
            raise ValueError(f"batch_size and max_atoms must be >= 1, got {batch_size} and {max_atoms}")
        for chunk in chunks(structures, batch_size, max_atoms):
            batch = self.batch(chunk)
            try:
                pred = self(batch, forces, stress)
            except ValueError as err:  # e.g. an unknown element: say which structures
                raise ValueError(f"{chunk[0].source} .. {chunk[-1].source}: {err}") from err
            yield chunk, batch, pred


def chunks(structures: Sequence[Structure], batch_size: int, max_atoms: int | None = None) -> Iterator[list]:
    """Consecutive slices of at most ``batch_size`` structures and ``max_atoms``
    atoms (at least one structure each)."""
    start, atoms = 0, 0
    for i, s in enumerate(structures):
        if i > start and (i - start == batch_size or (max_atoms is not None and atoms + s.n_atoms > max_atoms)):
            yield list(structures[start:i])
            start, atoms = i, 0
        atoms += s.n_atoms
    if start < len(structures):
        yield list(structures[start:])


def label_fidelity(batch: dict, structures: Sequence[Structure], names: list[str]) -> dict:
    """``batch`` with :data:`mfmlip.keys.LABEL_FIDELITY`: each structure's label
    fidelity as an index into ``names`` (for per-fidelity metrics)."""
    index = torch.tensor([names.index(s.fidelity) for s in structures], device=batch[K.FIDELITY].device)
    return {**batch, K.LABEL_FIDELITY: index}
