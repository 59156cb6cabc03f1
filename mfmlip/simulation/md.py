"""Molecular dynamics with ASE integrators: NVT, NPT, NVE, with a CSV log and resumable checkpoints.

The settings of a run are one :class:`MDSettings`, checked when made;
:func:`run_md` integrates them on a structure and writes the files.

Integrators (all from ASE, none written here):

* ``nve``: :class:`ase.md.verlet.VelocityVerlet`.
* ``nvt``: ``thermostat="langevin"`` (default) :class:`ase.md.langevin.Langevin`
  with the centre of mass held by :class:`ase.constraints.FixCom` (ASE's
  replacement for the deprecated ``fixcm=True``; the logged temperature then
  counts 3N - 3 degrees of freedom);
  ``thermostat="nose-hoover"`` :class:`ase.md.nose_hoover_chain.NoseHooverChainNVT`.
* ``npt``: ``barostat="mtk"`` (default)
  :class:`ase.md.nose_hoover_chain.IsotropicMTKNPT`, Martyna-Tobias-Klein
  isotropic NPT with Nose-Hoover chains. It samples the true isothermal-isobaric
  ensemble, accepts any cell (unlike :class:`ase.md.npt.NPT`, which needs an
  upper-triangular cell and is known to be fragile) and keeps the cell shape.
  ``barostat="berendsen"``: :class:`ase.md.nptberendsen.NPTBerendsen`, weak
  coupling; robust for equilibrating far from the target state but its volume
  fluctuations are wrong, so use it for equilibration, not for sampling.

Checkpoints (JSON, written to a temporary file and renamed, so a kill never
leaves a half-written one) hold the atoms with momenta and cell, the step
count, the random-generator state and the thermostat/barostat variables. A
run restarted with ``resume=True`` continues from the last checkpoint: log
rows and trajectory frames written after it are dropped and redone, so the
finished run has each step exactly once.
"""

from __future__ import annotations

import csv
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.io.jsonio import decode, encode
from ase.io.trajectory import Trajectory
from ase.md.velocitydistribution import Stationary

from mfmlip.atomic_io import atomic_write

#: the ensembles, NVT thermostats and NPT barostats :class:`MDSettings` accepts
ENSEMBLES = ("nvt", "npt", "nve")
THERMOSTATS = ("langevin", "nose-hoover")
BAROSTATS = ("mtk", "berendsen")
#: columns of the CSV log, in order, with units in the names
LOG_COLUMNS = ("step", "time_ps", "temperature_K", "epot_eV", "ekin_eV", "etot_eV", "volume_A3", "pressure_GPa")
CHECKPOINT_FORMAT = "mfmlip-md-checkpoint"
CHECKPOINT_VERSION = 1

# Extended-system variables of the Nose-Hoover/MTK integrators. ASE has no
# public API for them, so they are read and written by attribute name; if a
# future ASE renames them, a resume warns and restarts them from zero.
_EXTENDED_STATE = {
    "NoseHooverChainNVT": ("_thermostat._eta", "_thermostat._p_eta"),
    "IsotropicMTKNPT": ("_thermostat._eta", "_thermostat._p_eta", "_barostat._xi", "_barostat._p_xi", "_p_eps"),
}


@dataclass(frozen=True)
class MDSettings:
    """The settings of an MD run, checked when made.

    Attributes
    ----------
    ensemble : {"nvt", "npt", "nve"}
    temperature_K : float or None
        Target temperature, K (required, > 0, for nvt/npt); for nve the
        temperature of the initial velocities (None: the momenta stored in the
        starting structure, zero if none).
    pressure_GPa : float
        Target pressure for npt, GPa.
    timestep_fs : float
        Time step, fs (> 0).
    steps : int
        Total number of steps of the run, counting steps done before a resume (>= 0).
    seed : int
        Seed of the numpy generator for initial velocities and the Langevin
        noise; its state is checkpointed, so a resumed Langevin run follows the
        same trajectory as an uninterrupted one.
    log_interval, trajectory_interval, checkpoint_interval : int
        Steps between log rows, trajectory frames and checkpoints (>= 1).
    thermostat : {"langevin", "nose-hoover"}
        NVT integrator.
    barostat : {"mtk", "berendsen"}
        NPT integrator (see the module docstring for the choice).
    friction_per_fs : float
        Langevin friction, 1/fs (0.01/fs: a velocity memory of 100 fs).
    tdamp_fs, pdamp_fs : float or None
        Nose-Hoover/MTK thermostat and barostat time constants (Berendsen:
        ``taut``, ``taup``), fs; None: 100 and 1000 time steps.
    compressibility_per_GPa : float
        Berendsen barostat only: assumed isothermal compressibility, 1/GPa
        (0.01/GPa ~ a solid with B = 100 GPa; ~0.45/GPa for liquid water).

    Raises
    ------
    ValueError
        Unknown ensemble/thermostat/barostat, missing or non-positive
        temperature for nvt/npt, negative temperature, non-positive timestep
        or intervals, negative ``steps``.
    """

    ensemble: str = "nvt"
    temperature_K: float | None = None
    pressure_GPa: float = 0.0
    timestep_fs: float = 0.5
    steps: int = 1000
    seed: int = 0
    log_interval: int = 10
    trajectory_interval: int = 10
    checkpoint_interval: int = 100
    thermostat: str = "langevin"
    barostat: str = "mtk"
    friction_per_fs: float = 0.01
    tdamp_fs: float | None = None
    pdamp_fs: float | None = None
    compressibility_per_GPa: float = 0.01

    def __post_init__(self):
        ensemble, temperature = self.ensemble, self.temperature_K
        if ensemble not in ENSEMBLES:
            raise ValueError(f"unknown ensemble {ensemble!r}; choose from {list(ENSEMBLES)}")
        if ensemble == "nvt" and self.thermostat not in THERMOSTATS:
            raise ValueError(f"unknown thermostat {self.thermostat!r}; choose from {list(THERMOSTATS)}")
        if ensemble == "npt" and self.barostat not in BAROSTATS:
            raise ValueError(f"unknown barostat {self.barostat!r}; choose from {list(BAROSTATS)}")
        if ensemble in ("nvt", "npt") and (temperature is None or not temperature > 0):
            raise ValueError(f"{ensemble} needs a temperature > 0 K, got {temperature}")
        if temperature is not None and temperature < 0:
            raise ValueError(f"temperature must be >= 0 K, got {temperature}")
        if not self.timestep_fs > 0:
            raise ValueError(f"timestep must be > 0 fs, got {self.timestep_fs}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        intervals = (self.log_interval, self.trajectory_interval, self.checkpoint_interval)
        if min(intervals) < 1:
            raise ValueError(f"log/trajectory/checkpoint intervals must be >= 1 step, got {intervals}")

    @property
    def method(self) -> str:
        """The integrator: the thermostat (nvt), the barostat (npt) or ``"velocity-verlet"`` (nve)."""
        return {"nvt": self.thermostat, "npt": self.barostat, "nve": "velocity-verlet"}[self.ensemble]


@dataclass
class MDResult:
    """What :func:`run_md` did.

    Attributes
    ----------
    atoms : ase.Atoms
        Final structure with momenta (the calculator attached).
    steps : int
        Total steps of the run now done (equals ``settings.steps``).
    steps_run : int
        Steps integrated by this call (fewer than ``steps`` after a resume).
    resumed_from : int or None
        Step of the checkpoint this call continued from; None for a new run.
    log, trajectory, checkpoint : Path or None
        Files written.
    """

    atoms: Atoms
    steps: int
    steps_run: int
    resumed_from: int | None
    log: Path | None
    trajectory: Path | None
    checkpoint: Path | None


def run_md(
    atoms: Atoms,
    calc: Calculator,
    settings: MDSettings,
    trajectory: str | Path | None = None,
    logfile: str | Path | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> MDResult:
    """Run (or continue) molecular dynamics for a total of ``settings.steps`` steps.

    A new run starts from a copy of ``atoms`` (not modified). If
    ``settings.temperature_K`` is given, velocities are drawn from a
    Maxwell-Boltzmann distribution at that temperature (random generator
    seeded with ``settings.seed``) and the centre-of-mass momentum is removed;
    without it (``nve`` only) the momenta stored in ``atoms`` are used (zero
    if none).

    Parameters
    ----------
    atoms : ase.Atoms
        Starting structure, n_atoms atoms; 3D-periodic for ``npt``.
    calc : ase Calculator
        Energy (eV), forces (eV/Angstrom); stress (eV/Angstrom^3) for ``npt``.
    settings : MDSettings
        Ensemble, temperature (K), pressure (GPa), time step (fs), steps,
        intervals, integrator options, seed.
    trajectory : path, optional
        ASE ``.traj`` file, a frame (positions, momenta, cell, energy,
        forces; ``info["step"]``) at every multiple of
        ``settings.trajectory_interval`` steps, step 0 included, so frames
        stay evenly spaced across resumes.
    logfile : path, optional
        CSV log, a row every ``settings.log_interval`` steps and at the last
        step; columns :data:`LOG_COLUMNS`: step, time (ps), temperature (K),
        potential/kinetic/total energy (eV), volume (Angstrom^3; NaN unless
        3D-periodic) and pressure including the kinetic term (GPa; NaN
        unless 3D-periodic with a stress-capable calculator).
    checkpoint : path, optional
        JSON checkpoint written every ``settings.checkpoint_interval`` steps
        and at the end, atomically (temporary file + ``os.replace``).
    resume : bool
        Continue from ``checkpoint`` if it exists (then ``atoms`` only has to
        match its chemical symbols); if it does not exist a new run starts.
    progress : bool
        Show a tqdm progress bar on stderr.

    Returns
    -------
    MDResult

    Raises
    ------
    TypeError
        ``settings`` is not an :class:`MDSettings`.
    ValueError
        npt on a non-periodic structure or with a calculator without stress,
        constraints with the MTK barostat, ASE too old for the chosen
        integrator, ``resume`` without ``checkpoint``, or a checkpoint that
        does not match (other format, symbols, ensemble, integrator or
        timestep).
    """
    _check_system(atoms, calc, settings)
    paths = _output_paths(logfile, trajectory, checkpoint)
    state = _resume_state(paths[2], atoms, settings) if resume else None
    resumed = state is not None
    rng = np.random.default_rng(settings.seed)
    current, start, n_frames = _initial_state(atoms, settings, state, rng)
    current.calc = calc
    dyn = _make_dynamics(current, settings, rng)
    if resumed:
        _set_extended_state(dyn, state.get("extended", {}))
    dyn.nsteps = start  # observers fire on the global step count; no repeat of step `start`
    if not resumed or start < settings.steps:  # a finished run is not touched
        _integrate(current, dyn, rng, settings, paths, resumed, n_frames, progress)
    return MDResult(current, dyn.nsteps, dyn.nsteps - start, start if resumed else None, *paths)


def read_log(path: str | Path) -> dict[str, np.ndarray]:
    """Read a :func:`run_md` CSV log: ``{column: ndarray of shape (n_rows,)}``, units as in the column names."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"MD log {path} has no rows")
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def save_checkpoint(path: str | Path, atoms: Atoms, step: int, rng: np.random.Generator,
                    extended: dict, settings: dict, n_frames: int) -> None:
    """Write an MD checkpoint atomically (temporary file in the same folder, fsync, ``os.replace``).

    Holds positions (Angstrom), momenta (amu Angstrom/ASE time), cell, the
    step count, the generator state, the thermostat/barostat variables
    ``extended``, the run ``settings`` and the number of trajectory frames.
    """
    path = Path(path)
    snapshot = atoms.copy()  # no calculator
    text = encode({
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": int(step), "atoms": snapshot,
        "rng_state": rng.bit_generator.state, "extended": extended, "settings": settings, "n_frames": int(n_frames),
    })
    atomic_write(path, lambda fh: fh.write(text), mode="w")


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns a dict with ``step`` (int), ``atoms`` (ase.Atoms with momenta),
    ``rng_state``, ``extended``, ``settings`` and ``n_frames``.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is not an mfmlip MD checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MD checkpoint {path} not found")
    try:
        state = decode(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not a readable MD checkpoint: {err}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an mfmlip MD checkpoint")
    return state


# --- internals -------------------------------------------------------------


def _check_system(atoms, calc, settings: MDSettings) -> None:
    """``settings`` is an MDSettings, and the structure and calculator give what its ensemble needs."""
    if not isinstance(settings, MDSettings):
        raise TypeError(f"settings must be an MDSettings, got {type(settings).__name__}")
    if settings.ensemble != "npt":
        return
    if not bool(np.all(atoms.pbc)):
        raise ValueError(f"npt needs a 3D-periodic structure, got pbc={atoms.pbc.tolist()}")
    if "stress" not in getattr(calc, "implemented_properties", ()):
        raise ValueError(f"npt needs stress, which {type(calc).__name__} does not provide")


def _run_record(settings: MDSettings, atoms) -> dict:
    """The ``settings`` entry of a checkpoint: what a resume must match."""
    return {"ensemble": settings.ensemble, "method": settings.method, "timestep_fs": float(settings.timestep_fs),
            "symbols": atoms.get_chemical_symbols()}


def _output_paths(logfile, trajectory, checkpoint) -> tuple:
    """(log, trajectory, checkpoint) as Paths or None, their folders created."""
    paths = tuple(Path(p) if p is not None else None for p in (logfile, trajectory, checkpoint))
    for p in paths:
        if p is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
    return paths


def _resume_state(path, atoms, settings: MDSettings) -> dict | None:
    """The checked checkpoint to continue from; None (said so) if there is none yet."""
    if path is None:
        raise ValueError("resume=True needs the checkpoint path")
    if not path.is_file():
        print(f"resume: no checkpoint at {path}; starting a new run", flush=True)
        return None
    state = load_checkpoint(path)
    _check_checkpoint(state, atoms, _run_record(settings, atoms), path)
    return state


def _check_checkpoint(state, atoms, record, path):
    saved = state.get("settings", {})
    if saved.get("symbols") != record["symbols"]:
        raise ValueError(f"checkpoint {path} holds {state['atoms'].get_chemical_formula()}, "
                         f"not the given structure {atoms.get_chemical_formula()}")
    for key in ("ensemble", "method", "timestep_fs"):
        if saved.get(key) != record[key]:
            raise ValueError(f"checkpoint {path} was run with {key}={saved.get(key)!r}, now {record[key]!r}; "
                             "resume with the same settings or start a new run without resume")


def _initial_state(atoms, settings: MDSettings, state, rng):
    """(atoms to integrate, step, trajectory frames so far): from the checkpoint, or a new thermalised copy."""
    if state is not None:
        rng.bit_generator.state = state["rng_state"]
        return state["atoms"], int(state["step"]), int(state["n_frames"])
    current = atoms.copy()
    if settings.temperature_K is not None:
        _thermalize(current, settings.temperature_K, rng)
        Stationary(current)
    return current, 0, 0


def _thermalize(atoms, temperature_K, rng):
    try:  # ASE >= 3.29 name
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)


def _make_dynamics(atoms, settings: MDSettings, rng):
    """The ASE integrator of ``settings`` on ``atoms`` (Langevin noise drawn from ``rng``)."""
    s = settings
    dt = s.timestep_fs * units.fs
    tdamp = (s.tdamp_fs if s.tdamp_fs is not None else 100 * s.timestep_fs) * units.fs
    pdamp = (s.pdamp_fs if s.pdamp_fs is not None else 1000 * s.timestep_fs) * units.fs
    if s.ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    if s.ensemble == "nvt" and s.thermostat == "langevin":
        from ase.constraints import FixCom
        from ase.md.langevin import Langevin

        # ASE >= 3.28 deprecates Langevin(fixcm=True) (biased sampling); FixCom is its replacement
        if not any(isinstance(c, FixCom) for c in atoms.constraints):
            atoms.set_constraint(list(atoms.constraints) + [FixCom()])
        return Langevin(atoms, timestep=dt, temperature_K=s.temperature_K, friction=s.friction_per_fs / units.fs,
                        fixcm=False, rng=rng)
    if s.ensemble == "nvt":
        cls = _nose_hoover("NoseHooverChainNVT")
        return cls(atoms, timestep=dt, temperature_K=s.temperature_K, tdamp=tdamp)
    pressure = s.pressure_GPa * units.GPa
    if s.barostat == "mtk":
        cls = _nose_hoover("IsotropicMTKNPT")
        try:
            return cls(atoms, timestep=dt, temperature_K=s.temperature_K, pressure_au=pressure,
                       tdamp=tdamp, pdamp=pdamp)
        except NotImplementedError as err:  # e.g. constraints
            raise ValueError(f"barostat='mtk': {err}; use barostat='berendsen'") from err
    from ase.md.nptberendsen import NPTBerendsen

    return NPTBerendsen(atoms, timestep=dt, temperature_K=s.temperature_K, pressure_au=pressure,
                        taut=tdamp, taup=pdamp, compressibility_au=s.compressibility_per_GPa / units.GPa)


def _nose_hoover(name):
    try:
        import ase.md.nose_hoover_chain as nhc

        return getattr(nhc, name)
    except (ImportError, AttributeError):
        import ase

        raise ValueError(f"ase.md.nose_hoover_chain.{name} is not in ASE {ase.__version__} (needs a newer ASE); "
                         "use thermostat='langevin' or barostat='berendsen'") from None


def _attr_path(obj, dotted):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def _get_extended_state(dyn) -> dict:
    names = _EXTENDED_STATE.get(type(dyn).__name__, ())
    try:
        return {n: np.array(_attr_path(dyn, n), dtype=float) for n in names}
    except AttributeError:
        return {}


def _set_extended_state(dyn, extended: dict) -> None:
    names = _EXTENDED_STATE.get(type(dyn).__name__, ())
    if not names:
        return
    if set(extended) != set(names):
        warnings.warn(f"checkpoint has no {type(dyn).__name__} thermostat/barostat state; "
                      "those variables restart from zero", RuntimeWarning, stacklevel=3)
        return
    for dotted, value in extended.items():
        *parents, leaf = dotted.split(".")
        owner = _attr_path(dyn, ".".join(parents)) if parents else dyn
        old = getattr(owner, leaf)
        setattr(owner, leaf, float(value) if np.ndim(old) == 0 else np.array(value, dtype=float))


def _integrate(atoms, dyn, rng, settings: MDSettings, paths, resumed: bool, n_frames: int, progress: bool) -> None:
    """Run ``dyn`` from its step to ``settings.steps``, writing log, frames and checkpoints on the way."""
    from tqdm.auto import tqdm

    with ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=settings.steps, initial=dyn.nsteps, unit="step",
                                       desc=f"MD {settings.ensemble}", disable=not progress,
                                       mininterval=1.0, dynamic_ncols=True))
        out = _Recorder(atoms, dyn, rng, settings, paths, resumed, n_frames, stack)
        dyn.attach(lambda: bar.update(dyn.nsteps - bar.n), interval=1)
        dyn.attach(out.write_log, interval=settings.log_interval)
        dyn.attach(out.write_frame, interval=settings.trajectory_interval)
        dyn.attach(out.write_checkpoint, interval=settings.checkpoint_interval)  # last: after log and frame
        dyn.run(steps=settings.steps - dyn.nsteps)
        out.write_log()  # the final step is always logged and checkpointed
        out.write_checkpoint()


class _Recorder:
    """The observers of one run: log rows, trajectory frames, checkpoints.

    The files are opened on ``stack`` and closed with it; on resume the log
    and the trajectory are first cut back to the checkpoint's step.
    """

    def __init__(self, atoms, dyn, rng, settings: MDSettings, paths, resumed: bool, n_frames: int, stack):
        log_path, traj_path, self.checkpoint = paths
        self.atoms, self.dyn, self.rng, self.timestep_fs = atoms, dyn, rng, settings.timestep_fs
        self.record, self.n_frames, self.last_logged = _run_record(settings, atoms), n_frames, None
        self.log = self.writer = self.traj = None
        if log_path is not None:
            self.log, self.writer = _open_log(log_path, dyn.nsteps if resumed else None)
            stack.enter_context(self.log)
        if traj_path is not None:
            if resumed:
                self.n_frames = _truncate_trajectory(traj_path, n_frames)
            self.traj = stack.enter_context(Trajectory(str(traj_path), "a" if resumed else "w"))

    def write_log(self) -> None:
        step = self.dyn.nsteps
        if self.writer is not None and self.last_logged != step:
            self.writer.writerow(_log_row(self.atoms, step, self.timestep_fs))
            self.log.flush()
            self.last_logged = step

    def write_frame(self) -> None:
        if self.traj is not None:
            self.atoms.info["step"] = self.dyn.nsteps
            self.traj.write(self.atoms)
            self.n_frames += 1

    def write_checkpoint(self) -> None:
        if self.checkpoint is not None:
            save_checkpoint(self.checkpoint, self.atoms, self.dyn.nsteps, self.rng, _get_extended_state(self.dyn),
                            self.record, self.n_frames)


def _log_row(atoms, step, timestep_fs):
    epot = atoms.get_potential_energy()
    ekin = atoms.get_kinetic_energy()
    volume = pressure = float("nan")
    if bool(np.all(atoms.pbc)) and atoms.cell.rank == 3:
        volume = atoms.get_volume()
        if "stress" in getattr(atoms.calc, "implemented_properties", ()):
            stress = atoms.get_stress(voigt=False, include_ideal_gas=True)
            pressure = -np.trace(stress) / 3 / units.GPa
    values = (step * timestep_fs / 1000.0, atoms.get_temperature(), epot, ekin, epot + ekin, volume, pressure)
    return [step] + [f"{v:.10g}" for v in values]


def _open_log(path: Path, resume_step: int | None):
    """Open the CSV log; on resume keep only rows up to ``resume_step`` (later ones are redone)."""
    if resume_step is not None and path.is_file():
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        if rows and tuple(rows[0]) == LOG_COLUMNS:
            kept = [r for r in rows[1:] if r and int(r[0]) <= resume_step]
            _atomic_write_csv(path, [list(LOG_COLUMNS)] + kept)
            fh = open(path, "a", newline="")
            return fh, csv.writer(fh)
    fh = open(path, "w", newline="")
    writer = csv.writer(fh)
    writer.writerow(LOG_COLUMNS)
    fh.flush()
    return fh, writer


def _atomic_write_csv(path: Path, rows) -> None:
    atomic_write(path, lambda fh: csv.writer(fh).writerows(rows), mode="w", newline="")


def _truncate_trajectory(path: Path, n_frames: int) -> int:
    """Keep the first ``n_frames`` frames (those before the checkpoint); return how many there are."""
    if not path.is_file():
        return 0
    with Trajectory(str(path)) as reader:
        available = len(reader)
        if available <= n_frames:
            return available
        frames = [reader[i] for i in range(n_frames)]

    def write(fh):
        with Trajectory(fh, "w") as writer:
            for frame in frames:
                writer.write(frame)

    atomic_write(path, write)
    return n_frames
