"""A potential's energy, forces and stress as one compiled graph (``training.compile``).

Force training differentiates the forces once more (a double backward), and
a ``torch.compile`` region cannot be differentiated twice. So, as
:mod:`mfmlip.model.export` does for a file, the energy and its derivatives are
first unrolled by ``make_fx`` into one graph of ATen operations: a pure
function of the weights and the batch. The loss's backward is then a single
backward through that graph, and ``torch.compile`` (Inductor) compiles and
fuses both (the route NequIP's ``compile_mode`` takes).

One correction makes the unrolled graph exact: autograd saves the outputs of
``sigmoid``, ``tanh`` and the like *detached* for their backward, and
``make_fx`` records that ``detach``; left in, the second derivative through
the gates would treat those outputs as constants (0.2 % wrong weight
gradients in float64). :func:`_drop_detach` removes them.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.func import functional_call

from mfmlip import keys as K
from mfmlip.model.interface import Potential

INPUTS = (K.POSITIONS, K.CELL, K.ATOMIC_NUMBERS, K.EDGE_INDEX, K.SHIFTS, K.BATCH, K.FIDELITY, K.N_ATOMS, K.PBC)


@contextlib.contextmanager
def traceable(model: Potential):
    """No data-dependent checks (unknown elements) and no duck-shaped sizes while tracing."""
    potentials = [m for m in model.modules() if isinstance(m, Potential)]
    duck = torch.fx.experimental._config.use_duck_shape
    torch.fx.experimental._config.use_duck_shape = False  # n_atoms == 3 must not fix a dimension
    for m in potentials:
        m.check_species = False
    try:
        yield
    finally:
        torch.fx.experimental._config.use_duck_shape = duck
        for m in potentials:
            m.check_species = True


def _drop_detach(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``graph`` with every ``aten.detach`` replaced by its input (module docstring)."""
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.recompile()
    return graph


def _cpu_options() -> dict:
    """Inductor's options for a CPU graph, and its process-wide ``compile_threads = 1``
    (docs/benchmarks/compile.md); a ``TORCHINDUCTOR_*`` variable of the same name wins."""
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # compile in this process: Inductor's pool of compile workers, left running, made every later
        # CPU step 1.75x slower and the compile itself slower
        torch._inductor.config.compile_threads = 1
    # kernels launched from C++, not Python: the main job's graph compiled in 14-25 % less time and
    # its steps took 5-16 % less (session 15)
    return {} if "TORCHINDUCTOR_CPP_WRAPPER" in os.environ else {"cpp_wrapper": True}


class CompiledPotential:
    """``model(batch, compute_forces=..., compute_stress=...)`` for training or inference, compiled.

    One graph per set of derivatives asked for (energy only for a batch of an
    energy-only level, as the eager step does; energy and forces; and stress)
    and per mode of ``model`` (training or eval), each traced on the first
    batch that asks for it. Sizes are symbolic, so batches of other numbers of
    structures, atoms and edges reuse the graph; as a trace fixes sizes 0 and
    1, a batch of one atom or edge runs eagerly, and so does a batch of one
    structure in training. In eval mode one structure (a calculator's or MD's
    every call) gets a graph of its own, with that size fixed. A trace and
    compile cost minutes on a CPU (the main job: ~0.3 min trace, ~2.5 min
    compile on one core) and pay back over many steps
    (docs/benchmarks/compile.md). Weights and buffers are read from ``model``
    at every call, so optimiser steps and loaded checkpoints are seen.

    Parameters
    ----------
    model : an :class:`~mfmlip.model.interface.Potential`. In training mode its
        forces keep their graph for the force loss; in eval mode (inference)
        the graph runs under ``torch.no_grad``: forces without
        ``create_graph``, outputs without a graph to the weights.
    backend : ``torch.compile`` backend (``"inductor"`` fuses), or None to run
        the unrolled graph as it is.

    Returns (when called with a batch of :mod:`mfmlip.keys` tensors)
    -------
    ``{"energy": (n_graphs,) eV}``, with ``"forces": (n_atoms, 3) eV/A`` if
    ``compute_forces`` and ``"stress": (n_graphs, 3, 3) eV/A^3`` if
    ``compute_stress``; equal to the eager model's to float round-off, in
    training derivatives with respect to the weights included.
    """

    def __init__(self, model: Potential, backend: str | None = "inductor"):
        self.model, self.backend = model, backend
        self._graphs: dict[tuple, object] = {}  # (derivatives, training, one structure) -> graph
        self.trace_seconds = 0.0  # of the make_fx traces (each compile happens in the first call after it)

    @staticmethod
    def _outputs(derivatives: tuple[bool, bool]) -> tuple[str, ...]:
        return (K.ENERGY,) + ((K.FORCES,) if derivatives[0] else ()) + ((K.STRESS,) if derivatives[1] else ())

    def _trace(self, derivatives: tuple[bool, bool], weights: dict, tensors: list):
        outputs, forces, stress = self._outputs(derivatives), *derivatives

        def function(weights, *tensors):
            out = functional_call(self.model, weights, (dict(zip(INPUTS, tensors)),),
                                  {"compute_forces": forces, "compute_stress": stress})
            return tuple(out[k] for k in outputs)

        start, frozen = time.perf_counter(), {k: v.detach() for k, v in weights.items()}
        with traceable(self.model):
            graph = make_fx(function, tracing_mode="symbolic", _allow_non_fake_inputs=True)(frozen, *tensors)
        graph = _drop_detach(graph)
        self.trace_seconds += time.perf_counter() - start
        if self.backend is None:
            return graph
        options = _cpu_options() if self.backend == "inductor" and tensors[0].device.type == "cpu" else None
        return torch.compile(graph, backend=self.backend, dynamic=True, options=options)

    def __call__(self, batch: dict, compute_forces: bool = True, compute_stress: bool = False) -> dict:
        derivatives = (compute_forces or compute_stress, compute_stress)  # stress comes with forces
        outputs = self._outputs(derivatives)
        training, n_graphs = self.model.training, batch[K.N_ATOMS].shape[0]
        # a trace fixes sizes 0 and 1: such batches (rare, small) run eagerly, but for one structure in
        # inference, which gets a graph of its own
        if min(batch[K.POSITIONS].shape[0], batch[K.EDGE_INDEX].shape[1]) < 2 or n_graphs < (2 if training else 1):
            out = self.model(batch, compute_forces=derivatives[0], compute_stress=derivatives[1])
            return {k: out[k] for k in outputs}
        key = (derivatives, training, n_graphs == 1)
        weights = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        tensors = [batch[k] for k in INPUTS]
        with contextlib.nullcontext() if training else torch.no_grad():  # inference: no graph to the weights
            if key not in self._graphs:
                self._graphs[key] = self._trace(derivatives, weights, tensors)
            return dict(zip(outputs, self._graphs[key](weights, *tensors)))
