"""Adding a fidelity to a trained model, for every conditioning scheme."""

from __future__ import annotations

import torch
from e3nn import o3

from mfmlip.model.potential import MFPotential
from mfmlip.model.sevennet import SevenNetPotential


def _grow(old: torch.Tensor, new: torch.Tensor, n_old: int, source: int) -> torch.Tensor:
    """Copy ``old`` into ``new``, which is one longer along one dimension.

    The fidelity block is the trailing ``n_old`` entries of that dimension in
    every layout mfmlip uses (one-hot columns, embedding rows, head rows, E0
    rows); the new last entry starts as a copy of fidelity ``source``.
    """
    (dim,) = [d for d, (a, b) in enumerate(zip(old.shape, new.shape, strict=True)) if b == a + 1]
    out = new.detach().clone()
    size = old.shape[dim]
    out.narrow(dim, 0, size).copy_(old)
    out.narrow(dim, size, 1).copy_(old.narrow(dim, size - n_old + source, 1))
    return out


def _grow_linear(old_lin: o3.Linear, new_lin: o3.Linear, old_w, new_w, n_old: int, source: int):
    """Per-instruction :func:`_grow` of the flat weight of an e3nn ``Linear``.

    e3nn divides each path by the square root of its output's fan-in, which
    the extra input changes; the weights are rescaled so outputs stay the same.
    """
    out = new_w.detach().clone()
    old_views = old_lin.weight_views(weight=old_w, yield_instruction=True)
    new_views = new_lin.weight_views(weight=out, yield_instruction=True)
    for (_, old_ins, o), (_, new_ins, n) in zip(old_views, new_views, strict=True):
        grown = o if o.shape == n.shape else _grow(o, n, n_old, source)
        n.copy_(grown * (old_ins.path_weight / new_ins.path_weight))
    return out


def add_fidelity(model: MFPotential | SevenNetPotential, name: str, like: str | None = None):
    """A copy of ``model`` that also knows fidelity ``name``.

    Everything the fidelity touches (one-hot columns of the conditioned linear
    layers, the state-embedding row, the readout head, the E0 row; for a
    SevenNet model its modal one-hot columns and shift row) starts as a copy of
    fidelity ``like`` (default: the first one), so the new fidelity predicts
    exactly what ``like`` does until it is fine-tuned.

    Raises
    ------
    ValueError
        ``name`` exists already, ``like`` is unknown, or the model has no
        fidelity input (a single-fidelity SevenNet model).

    Examples
    --------
    >>> from mfmlip.model.spec import ModelSpec
    >>> m = MFPotential(ModelSpec(species=[1, 8], fidelities=["PBE"], channels=8, num_layers=1))
    >>> add_fidelity(m, "CCSD(T)", like="PBE").fidelities
    ['PBE', 'CCSD(T)']
    """
    if name in model.fidelities:
        raise ValueError(f"fidelity {name!r} exists already in {model.fidelities}")
    source = model.fidelity_index(like) if like is not None else 0
    if isinstance(model, SevenNetPotential):
        new = model.with_fidelity(name, model.fidelities[source])
    else:
        new = MFPotential(model.spec.model_copy(update={"fidelities": [*model.fidelities, name]})).to(model.dtype)
    new.load_state_dict(_grown_state(model, new, source))
    return new.train(model.training)


def _grown_state(model: torch.nn.Module, new: torch.nn.Module, source: int) -> dict:
    """``model``'s state laid out as ``new``'s, which has one fidelity more (a copy of ``source``)."""
    n_old = len(model.fidelities)
    old_state, old_modules = model.state_dict(), dict(model.named_modules())
    new_modules = dict(new.named_modules())
    state = {}
    for key, new_t in new.state_dict().items():
        old_t = old_state[key]
        module_name = key.rpartition(".")[0]
        if old_t.shape == new_t.shape:
            state[key] = old_t
        elif isinstance(old_modules.get(module_name), o3.Linear):
            state[key] = _grow_linear(old_modules[module_name], new_modules[module_name], old_t, new_t, n_old, source)
        else:
            state[key] = _grow(old_t, new_t, n_old, source)
    return state
