"""Simulations through ASE: relaxation, equation of state, molecular dynamics.

The calculator (:class:`mfmlip.simulation.calculator.MFCalculator`, needs torch)
is not imported here; use ``from mfmlip import MFCalculator``. Batched
relaxation and MD of many systems at once go through torch-sim:
:class:`mfmlip.simulation.torchsim.MFTorchSimModel` (optional extra ``torchsim``).
"""

from mfmlip.simulation.eos import EOSResult, equation_of_state, fit_eos, plot_eos
from mfmlip.simulation.md import MDResult, MDSettings, load_checkpoint, read_log, run_md
from mfmlip.simulation.relax import max_force, relax

__all__ = ["relax", "max_force", "equation_of_state", "fit_eos", "EOSResult", "plot_eos", "run_md", "MDSettings", "MDResult",
           "read_log", "load_checkpoint"]
