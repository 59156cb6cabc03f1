import os
from pathlib import Path

import numpy as np
import pytest

# Tiny models gain nothing from intra-op threads, and on a shared, busy CPU
# OpenMP spin-waiting makes every step ~40x slower. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from ase.build import bulk, molecule  # noqa: E402

from mfmlip.data.graph import atoms_to_batch  # noqa: E402
from mfmlip.model import MFPotential, ModelSpec  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _data_dir() -> Path:
    env = os.environ.get("MFMLIP_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not path.is_dir():
        pytest.fail(
            f"reference data folder {path} not found: set MFMLIP_DATA to the folder holding "
            "malonaldehyde/, silicon/, ethanol/ (default <repo>/../shared/data)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def data_file(data_dir):
    def _get(relative: str) -> Path:
        path = data_dir / relative
        if not path.is_file():
            pytest.fail(f"reference data file {path} not found (data folder {data_dir})", pytrace=False)
        return path

    return _get


def rattled_si():
    # primitive fcc cell (non-orthogonal), doubled along a1, sheared and rattled:
    # a general triclinic cell with no symmetry left
    atoms = bulk("Si", "diamond", a=5.43) * (2, 1, 1)
    shear = np.array([[0.0, 0.15, -0.1], [0.05, 0.0, 0.2], [-0.1, 0.1, 0.05]])
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + shear), scale_atoms=True)
    atoms.rattle(0.08, seed=3)
    return atoms


@pytest.fixture
def data_root_from_the_config(monkeypatch):
    """For tiny runs that give ``data.root``: MFMLIP_DATA (the reference data) would take precedence."""
    monkeypatch.delenv("MFMLIP_DATA", raising=False)


@pytest.fixture
def si_cell():
    return rattled_si()


@pytest.fixture
def ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=5)
    return atoms


@pytest.fixture
def make_model():
    def _make(species=(14,), fidelities=("PBE", "SCAN"), dtype=torch.float64, seed=0, e0=None, energy_scale=1.0,
              **kwargs):
        torch.manual_seed(seed)
        options = dict(cutoff=4.0, channels=8, lmax=2, num_layers=2, avg_num_neighbors=10.0)
        options.update(kwargs)
        spec = ModelSpec(species=list(species), fidelities=list(fidelities), **options)
        return MFPotential(spec, e0=e0, energy_scale=energy_scale).to(dtype).eval()

    return _make


def predict(model, atoms, fidelity: int = 0, stress: bool = False) -> dict:
    out = model(atoms_to_batch(atoms, model.cutoff, fidelity), compute_forces=True, compute_stress=stress)
    return {k: v.detach() for k, v in out.items()}
