import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from mfmlip.training.run import read_metrics

EPOCHS = 6


def _config(tmp_path, data_dir, name):
    cfg = {
        "seed": 3,
        "output_dir": str(tmp_path / name),
        "data": {"root": str(data_dir), "files": [{
            "path": "malonaldehyde/GFN2-xTB.extxyz", "index": "0:300",
            "split": {"train": 240, "val": 30, "test": 30}}]},
        "model": {"cutoff": 4.0, "channels": 8, "lmax": 1, "num_layers": 2},
        "training": {"batch_size": 16, "max_epochs": EPOCHS, "patience": 100},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config, *extra):
    cmd = [sys.executable, "-m", "mfmlip.cli.main", "train", str(config), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))


def _final_val_loss(run):
    rows = [r for r in read_metrics(run) if r.get("val_loss")]
    return int(rows[-1]["epoch"]), float(rows[-1]["val_loss"])


def test_run_killed_mid_training_resumes_to_the_same_result(tmp_path, data_dir):
    reference = _train(_config(tmp_path, data_dir, "reference"))
    killed_cfg = _config(tmp_path, data_dir, "killed")
    killed = _train(killed_cfg)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)  # no chance to clean up
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = torch.load(last, weights_only=False)["epoch"]
    assert done < EPOCHS - 1

    resumed = _train(killed_cfg, "--resume")
    for proc in (resumed, reference):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()

    # the resumed fit starts after the last finished epoch: nothing done twice
    fits = sorted((tmp_path / "killed" / "logs").glob("version_*/metrics.csv"))
    assert len(fits) == 2
    with open(fits[1], newline="") as fh:
        second = {int(r["epoch"]) for r in csv.DictReader(fh)}
    assert min(second) == done + 1
    every = {int(r["epoch"]) for r in read_metrics(tmp_path / "killed") if r.get("val_loss")}
    assert every == set(range(EPOCHS))
    # same seed, same batches in every epoch, same optimiser state: the same run
    ref_epoch, ref_loss = _final_val_loss(tmp_path / "reference")
    epoch, loss = _final_val_loss(tmp_path / "killed")
    assert epoch == ref_epoch == EPOCHS - 1
    assert loss == pytest.approx(ref_loss, rel=1e-5)
