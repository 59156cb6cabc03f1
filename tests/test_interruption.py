"""Interruption loses nothing: kills at random points (SIGTERM and SIGKILL), a
kill in the middle of a checkpoint write, and MD runs killed by a signal.

Every training here is the tiny water run of ``tiny_runs`` (24 molecules, a
model of a few hundred weights, ~0.1 s per epoch), so that a kill, a resume
and an uninterrupted reference together take a few seconds.

Tolerance: a resumed run must reproduce the uninterrupted one to a relative
1e-6 in every validation loss, test metric and weight (float32 training; on
CPU with one thread the two are in practice bit-identical).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from tiny_runs import tiny_config

from mfmlip.model import load_model
from mfmlip.simulation.md import MDSettings, load_checkpoint, read_log, run_md
from mfmlip.training.module import MFLightningModule
from mfmlip.training.run import read_metrics, train

pytestmark = pytest.mark.usefixtures("data_root_from_the_config")

EPOCHS = 12
RTOL = 1e-6
# kill points are random but seeded: a failure names its seed; MFMLIP_KILL_SEED=N replays it
KILL_SEED = int(os.environ.get("MFMLIP_KILL_SEED", "20261201"))
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}


def _cli(*args, prelude: str = ""):
    """``mfmlip ARGS`` in a new Python process (``prelude`` runs first)."""
    code = f"{prelude}\nimport sys\nfrom mfmlip.cli.main import main\nsys.exit(main({list(args)!r}))"
    env = {k: v for k, v in os.environ.items() if k != "MFMLIP_DATA"}  # data.root of the config counts
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(env, OMP_NUM_THREADS="1"))


def _val_losses(run) -> dict[int, float]:
    return {int(r["epoch"]): float(r["val_loss"]) for r in read_metrics(run) if r.get("val_loss")}


def _fit_epochs(run) -> list[set[int]]:
    """Epochs with a validation loss, per fit (logs/version_N)."""
    fits = sorted((run / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    out = []
    for path in fits:
        rows = path.read_text().splitlines()
        header = rows[0].split(",")
        e, v = header.index("epoch"), header.index("val_loss")
        out.append({int(cols[e]) for cols in (r.split(",") for r in rows[1:]) if cols[v]})
    return out


def _assert_same_run(run, reference):
    """Same validation losses, test metrics and weights as the uninterrupted run."""
    assert sorted(_val_losses(run)) == list(range(EPOCHS))
    ref_val = _val_losses(reference)
    for epoch, loss in _val_losses(run).items():
        assert loss == pytest.approx(ref_val[epoch], rel=RTOL), epoch
    metrics = json.loads((run / "test_metrics.json").read_text())
    ref_metrics = json.loads((reference / "test_metrics.json").read_text())
    for q in ("energy_mae", "energy_rmse", "forces_mae", "forces_rmse"):
        assert metrics["PBE"][q] == pytest.approx(ref_metrics["PBE"][q], rel=RTOL), q
    model, ref_model = load_model(run / "model.pt"), load_model(reference / "model.pt")
    assert model.metadata["epochs_trained"] == ref_model.metadata["epochs_trained"] == EPOCHS
    for (name, w), (_, w_ref) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        torch.testing.assert_close(w, w_ref, rtol=RTOL, atol=1e-9, msg=name)


def _is_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and "epoch" in obj and "state_dict" in obj


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process, and the epoch of every checkpoint it wrote."""
    folder = tmp_path_factory.mktemp("reference")
    save, writes = torch.save, []

    def counting_save(obj, fh, *args, **kwargs):
        if _is_checkpoint(obj):
            writes.append(obj["epoch"])
        return save(obj, fh, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MFMLIP_DATA", raising=False)
        mp.setattr(torch, "save", counting_save)
        train(tiny_config(folder, "run", max_epochs=EPOCHS))
    return folder / "run", writes


def _epoch_in(last):
    """Epoch of the checkpoint at ``last`` and a token of its version (None, None if absent)."""
    try:
        st = os.stat(last)
        return torch.load(last, map_location="cpu", weights_only=False)["epoch"], (st.st_ino, st.st_mtime_ns)
    except (FileNotFoundError, EOFError, RuntimeError):  # absent, or replaced while being read
        return None, None


@pytest.mark.parametrize("name", list(SIGNALS))
def test_training_killed_at_a_random_point_resumes_to_the_uninterrupted_result(name, tmp_path, reference):
    sig = SIGNALS[name]
    config = tiny_config(tmp_path, "run", max_epochs=EPOCHS)
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    # a random point: a random fraction of an epoch after the checkpoint of epoch k
    rng = random.Random(f"{KILL_SEED}-train-{name}")
    k, fraction = rng.randint(1, EPOCHS - 4), rng.random()
    point = f"{name} {fraction:.2f} of an epoch after the checkpoint of epoch {k} (MFMLIP_KILL_SEED={KILL_SEED})"
    proc = _cli("train", str(config))
    try:
        seen, first_seen, deadline = None, {}, time.monotonic() + 120
        while k not in first_seen and proc.poll() is None and time.monotonic() < deadline:
            st = os.stat(last) if os.path.exists(last) else None
            if st is not None and (st.st_ino, st.st_mtime_ns) != seen:
                epoch, seen = _epoch_in(last)
                if epoch is not None:
                    first_seen.setdefault(epoch, time.monotonic())
            time.sleep(0.002)
        if k not in first_seen:
            proc.kill()
            pytest.fail(f"{point}: checkpoints seen {sorted(first_seen)}; {proc.communicate()[1].decode()}")
        time.sleep(fraction * (first_seen[k] - first_seen[k - 1]))  # one epoch: between two checkpoints
        proc.send_signal(sig)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # ended by the signal, not by finishing (a SIGTERM is turned into an exception by Lightning)
    assert not (run / "model.pt").exists(), f"{point}: the run finished before it was killed"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # the CLI says how to continue and exits like a terminated process
        assert proc.returncode == 143, point
    done = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    assert k <= done < EPOCHS - 1, point

    train(config, resume=True)  # here rather than in a new process: a second import of torch costs seconds
    fits = _fit_epochs(run)
    assert len(fits) == 2, point
    assert min(fits[1]) == done + 1, f"{point}: the resumed fit must start after the last finished epoch"
    # a SIGKILL between the write of an epoch's validation row and the rename of its checkpoint
    # leaves that row in the killed fit's log; the epoch is then redone, with the same numbers
    assert max(fits[0]) in (done, done + 1), point
    _assert_same_run(run, reference[0])


def test_kill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, reference):
    # the process SIGKILLs itself halfway through writing its n-th checkpoint (best.ckpt or
    # last.ckpt): bytes are in the temporary file, the rename never happens. n is any write
    # after those of the first epoch.
    run_ref, writes = reference
    n = random.Random(f"{KILL_SEED}-write").randint(writes.count(0) + 1, len(writes))
    prelude = f"""
import os, signal, torch
_save, _calls = torch.save, [0]
def save(obj, fh, *args, **kwargs):
    if isinstance(obj, dict) and "epoch" in obj and "state_dict" in obj:  # a Lightning checkpoint
        _calls[0] += 1
        if _calls[0] == {n}:
            fh.write(b"HALF A CHECKPOINT")
            fh.flush()
            os.fsync(fh.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, fh, *args, **kwargs)
torch.save = save
"""
    config = tiny_config(tmp_path, "run", max_epochs=EPOCHS)
    run = tmp_path / "run"
    proc = _cli("train", str(config), prelude=prelude)
    _, err = proc.communicate(timeout=300)
    point = f"write {n} of {len(writes)} (epoch {writes[n - 1]}; MFMLIP_KILL_SEED={KILL_SEED})"
    assert proc.returncode == -signal.SIGKILL, f"{point}: {err.decode()}"
    (partial,) = (run / "checkpoints").glob(".*.tmp")  # the write that was cut short
    assert partial.read_bytes() == b"HALF A CHECKPOINT"
    target = run / "checkpoints" / partial.name[1 : partial.name.index(".ckpt.") + 5]  # .last.ckpt.XYZ.tmp
    assert target.name in ("best.ckpt", "last.ckpt"), point
    # the previous version of the file being written is intact, and so is the other one
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] in (writes[n - 1] - 1, writes[n - 1]), point  # the epoch before, or this one
    assert best["epoch"] <= writes[n - 1], point
    assert not (run / "model.pt").exists()

    train(config, resume=True)
    _assert_same_run(run, run_ref)


class Killed(Exception):
    """Stands in for a kill at an epoch boundary, in this process."""


def test_epochs_without_improvement_are_not_redone(tmp_path, monkeypatch):
    # zero loss weights: the validation loss stays 0, so epoch 0 is the only best one
    config = tiny_config(tmp_path, "run", max_epochs=6, weights={"energy": 0.0, "forces": 0.0})
    start_epoch = MFLightningModule.on_train_epoch_start

    def kill_at_epoch_4(self):
        if self.current_epoch == 4:
            raise Killed
        start_epoch(self)

    monkeypatch.setattr(MFLightningModule, "on_train_epoch_start", kill_at_epoch_4)
    with pytest.raises(Killed):
        train(config)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert torch.load(checkpoints / "best.ckpt", map_location="cpu", weights_only=False)["epoch"] == 0
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 3
    (stopping,) = (v for k, v in last["callbacks"].items() if k.startswith("EarlyStopping"))
    assert stopping["wait_count"] == 3  # written after early stopping counted epoch 3
    monkeypatch.undo()
    train(config, resume=True)
    assert _fit_epochs(tmp_path / "run") == [{0, 1, 2, 3}, {4, 5}]


# --- MD ---------------------------------------------------------------------------

MD_OPTIONS = {"temperature_K": 300, "timestep_fs": 1.0, "log_interval": 1, "trajectory_interval": 7,
              "checkpoint_interval": 10, "seed": 3}


def _md_files(folder):
    return {"logfile": folder / "md.csv", "trajectory": folder / "md.traj", "checkpoint": folder / "md.json"}


@pytest.mark.parametrize("name", list(SIGNALS))
def test_md_killed_by_a_signal_resumes_to_the_uninterrupted_trajectory(name, tmp_path):
    sig = SIGNALS[name]
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    killed.mkdir()
    ref.mkdir()
    files = {k: str(v) for k, v in _md_files(killed).items()}
    script = f"""
from ase.build import bulk
from ase.calculators.emt import EMT
from mfmlip.simulation.md import MDSettings, run_md
run_md(bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2), EMT(), MDSettings("nvt", steps=10**7, **{MD_OPTIONS!r}),
       progress=False, **{files!r})
"""
    rng = random.Random(f"{KILL_SEED}-md-{name}")
    threshold, delay = rng.randint(2, 8) * 10, rng.random() * 0.05  # s
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (killed / "md.json").is_file() and load_checkpoint(killed / "md.json")["step"] >= threshold:
                break
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    point = f"{name} {delay:.3f} s after the checkpoint of step {threshold} (MFMLIP_KILL_SEED={KILL_SEED})"
    assert proc.returncode == -sig, f"{point}: the MD process ended before it was killed"
    done = load_checkpoint(killed / "md.json")["step"]
    assert done >= threshold and done % 10 == 0, point
    target = done + 25

    settings = MDSettings("nvt", steps=target, **MD_OPTIONS)
    result = run_md(bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2), EMT(), settings, resume=True, progress=False,
                    **_md_files(killed))
    reference = run_md(bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2), EMT(), settings, progress=False,
                       **_md_files(ref))
    assert (result.resumed_from, result.steps_run) == (done, 25)  # finished steps are not redone
    log, ref_log = read_log(killed / "md.csv"), read_log(ref / "md.csv")
    assert log["step"].tolist() == ref_log["step"].tolist() == list(range(target + 1))
    np.testing.assert_allclose(log["etot_eV"], ref_log["etot_eV"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(result.atoms.positions, reference.atoms.positions, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.atoms.get_momenta(), reference.atoms.get_momenta(), rtol=0, atol=1e-10)
    frames = ase.io.read(killed / "md.traj", ":")
    assert [f.info["step"] for f in frames] == list(range(0, target + 1, 7))
