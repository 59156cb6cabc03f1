"""``mfmlip study``: the --quick grid of the shipped malonaldehyde study on a
small subset, held-out test geometry, failed runs recorded, re-runs skip
finished runs, and a killed study resumes."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mfmlip.cli.main import main
from mfmlip.study import load_study
from mfmlip.study.plan import CachedReader, fingerprint, plan_study
from mfmlip.training.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "examples" / "studies"
TINY_QUICK = {"test": 40, "pool": 40, "low_max": 80, "max_steps": 6, "seeds": [0],
              "fractions": [0.25, 1.0], "methods": ["heads", "single_fidelity", "transfer", "delta"]}


def tiny_study(tmp_path, **changes) -> Path:
    """The shipped malonaldehyde study with a tinier quick section, writing into tmp_path."""
    raw = yaml.safe_load((SHIPPED / "malonaldehyde.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "study")
    raw["quick"] = {**TINY_QUICK, **changes.pop("quick", {})}
    raw["training"]["val_interval_steps"] = 3
    # small and deterministic: a 16-channel model and a schedule over steps, not minutes
    raw["model"] = {**raw["model"], "channels": 16, "num_layers": 2}
    raw["training"] = {k: v for k, v in raw["training"].items() if k not in ("max_time_minutes", "decay_over")}
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def rows(tmp_path) -> list[dict]:
    with open(tmp_path / "study_quick" / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("name", ["malonaldehyde", "malonaldehyde_direct", "ethanol", "ethanol_energy_only", "nacl_water"])
def test_shipped_studies_validate_and_name_all_methods(name):
    cfg = load_study(SHIPPED / f"{name}.yaml")
    assert cfg.training.max_steps > 0
    assert cfg.reduced().results_dir().name == f"{name}_quick"
    assert set(cfg.reduced().grid.methods) <= set(cfg.grid.methods)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("study")
    path = tiny_study(tmp)
    assert main(["study", str(path), "--quick", "--jobs", "2", "--data-root", str(data_dir)]) == 0
    return tmp, path


def test_quick_study_writes_table_plot_and_one_row_per_run(quick):
    tmp, _ = quick
    table = rows(tmp)
    assert len(table) == 2 * 4  # fractions x methods, one seed
    assert {r["status"] for r in table} == {"done"}
    assert all(float(r["energy_mae"]) > 0 for r in table)
    assert {r["n_high"] for r in table} == {"10", "40"}
    md = (tmp / "study_quick" / "results.md").read_text()
    assert "| heads |" in md and "energy MAE (meV/atom)" in md and "claim holds" in md
    assert (tmp / "study_quick" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_no_test_structure_enters_any_training_set(quick, data_dir):
    _, path = quick
    cfg = load_study(path).reduced()
    plan = plan_study(cfg, data_dir, CachedReader())
    high_split = yaml.safe_load(next((cfg.results_dir() / "splits").glob("high_f1_seed0.yaml")).read_text())
    low_split = yaml.safe_load((cfg.results_dir() / "splits" / "low_0.yaml").read_text())
    reader = CachedReader()
    high = {s.frame: s for s in reader(data_dir / "malonaldehyde/CCSDT_CBS.extxyz")}
    low = {s.frame: s for s in reader(data_dir / "malonaldehyde/GFN2-xTB.extxyz")}
    test = {fingerprint(high[i]) for i in high_split["test"]}
    assert len(test) == plan.n_test == 40
    assert not test & {fingerprint(high[i]) for i in high_split["train"] + high_split["val"]}
    # the xTB file holds the same geometries: the test ones are kept out of the low level too
    assert not test & {fingerprint(low[i]) for i in low_split["train"] + low_split["val"]}


def test_rerun_skips_finished_runs(quick, data_dir, capsys):
    tmp, path = quick
    stamps = {p: p.stat().st_mtime for p in (tmp / "study_quick" / "runs").rglob("status.json")}
    assert main(["study", str(path), "--quick", "--data-root", str(data_dir)]) == 0
    assert "9 runs already done; 0 to run" in capsys.readouterr().out  # 8 grid runs + the low-level model
    assert stamps == {p: p.stat().st_mtime for p in stamps}


def test_transfer_and_delta_runs_make_the_models_they_claim(quick):
    from mfmlip.model import DeltaPotential, load_model

    tmp, _ = quick
    runs = tmp / "study_quick" / "runs"
    low = load_model(runs / "low" / "seed0" / "model.pt")
    delta = load_model(runs / "delta" / "f1_seed0" / "model.pt")
    assert isinstance(delta, DeltaPotential) and delta.base_fidelity == "GFN2-xTB"
    for p, q in zip(delta.base.state_dict().values(), low.state_dict().values()):
        assert (p == q).all()  # the base is the low-level model, untouched
    transfer = load_model(runs / "transfer" / "f1_seed0" / "model.pt")
    assert transfer.fidelities == ["GFN2-xTB", "CCSD(T)/CBS"]
    # frozen as configured (equal up to float32 rounding in the weight average); the rest trained
    assert torch.allclose(transfer.embedding.weight, low.embedding.weight, rtol=0, atol=1e-6)
    before = dict(low.named_parameters())
    moved = [n for n, p in transfer.named_parameters()
             if p.shape == before[n].shape and not torch.allclose(p, before[n], atol=1e-4)]
    assert moved and not any(n.startswith("embedding") for n in moved)


def test_a_failing_run_is_recorded_and_the_study_goes_on(tmp_path, data_dir):
    path = tiny_study(tmp_path, options={"transfer_freeze": ["no_such_module"]},
                      quick={"methods": ["single_fidelity", "transfer"], "fractions": [1.0]})
    assert main(["study", str(path), "--quick", "--data-root", str(data_dir)]) == 0
    status = {r["method"]: r for r in rows(tmp_path)}
    assert status["single_fidelity"]["status"] == "done"
    assert status["transfer"]["status"] == "failed"
    assert "no_such_module" in status["transfer"]["error"]
    assert "no_such_module" in (tmp_path / "study_quick" / "results.md").read_text()


def test_killed_study_resumes_and_skips_finished_runs(tmp_path, data_dir):
    path = tiny_study(tmp_path, quick={"methods": ["single_fidelity", "heads"], "fractions": [0.25, 1.0]})
    cmd = [sys.executable, "-m", "mfmlip.cli.main", "study", str(path), "--quick", "--jobs", "1",
           "--data-root", str(data_dir)]
    runs = tmp_path / "study_quick" / "runs"
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(runs.rglob("status.json")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and its running child
    proc.wait()
    finished = {p: p.stat().st_mtime for p in runs.rglob("status.json")}
    assert 1 <= len(finished) < 4
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"{len(finished)} runs already done; {4 - len(finished)} to run" in out.stdout
    assert {p: p.stat().st_mtime for p in finished} == finished
    assert {r["status"] for r in rows(tmp_path)} == {"done"}


def test_direct_and_narrow_picks_come_from_the_pool_at_the_asked_size(tmp_path, data_dir):
    path = tiny_study(tmp_path, grid={"selections": ["random", "direct", "narrow"]},
                      quick={"methods": ["single_fidelity"], "fractions": [0.25], "pool": 40})
    assert main(["study", str(path), "--quick", "--data-root", str(data_dir)]) == 0
    table = rows(tmp_path)
    assert sorted(r["selection"] for r in table) == ["direct", "narrow", "random"]
    assert {r["status"] for r in table} == {"done"}
    splits = {s: yaml.safe_load((tmp_path / "study_quick" / "splits" / f"high_{p}f0.25_seed0.yaml").read_text())
              for s, p in (("random", ""), ("direct", "direct_"), ("narrow", "narrow_"))}
    random_pick = set(splits["random"]["train"]) | set(splits["random"]["val"])  # n=10 of the 40-structure pool
    for s in splits.values():
        picked = s["train"] + s["val"]
        assert len(picked) == len(set(picked)) == 10 and not set(picked) & set(s["test"])
    assert set(splits["direct"]["train"] + splits["direct"]["val"]) != random_pick
    assert "single_fidelity (direct)" in (tmp_path / "study_quick" / "results.md").read_text()


def test_narrow_region_holds_the_share_or_n():
    from mfmlip.study.select import narrow_bounds

    scores = np.arange(100.0)[:, None]
    assert narrow_bounds(scores, 5, 0.2) == [(None, 19.5)]  # 20 lowest PC1 scores
    assert narrow_bounds(scores, 50, 0.2) == [(None, 49.5)]  # grows to hold n
    assert narrow_bounds(scores, 100, 0.2)[0][1] == np.inf


def test_an_equal_wall_time_budget_gives_each_stage_of_a_two_stage_method_half(tmp_path, data_dir):
    path = tiny_study(tmp_path, training={"max_time_minutes": 10.0, "decay_over": "time",
                                          "monitor": "val_energy_mae/CCSD(T)/CBS"})
    plan = plan_study(load_study(path).reduced(), data_dir, CachedReader())
    budget = {r.method: (r.config.training.max_time_minutes, r.config.training.max_steps, r.config.training.monitor)
              for r in plan.runs}
    assert budget["heads"] == (10.0, 6, "val_energy_mae/CCSD(T)/CBS")
    assert budget["single_fidelity"][:2] == (10.0, 6)
    for method in ("transfer", "delta"):
        assert budget[method] == (5.0, 3, "val_energy_mae/CCSD(T)/CBS")
    assert budget["low"] == (5.0, 3, "val_loss")  # the low-level run has no CCSD(T) to monitor


def test_sampling_shares_reach_each_run_for_its_own_fidelities(tmp_path, data_dir):
    path = tiny_study(tmp_path, training={"sampling": {"CCSD(T)/CBS": 0.5, "GFN2-xTB": 0.5}})
    plan = plan_study(load_study(path).reduced(), data_dir, CachedReader())
    shares = {r.method: r.config.training.sampling for r in plan.runs}
    assert shares["heads"] == {"CCSD(T)/CBS": 0.5, "GFN2-xTB": 0.5}
    for method in ("single_fidelity", "transfer", "delta", "low"):  # one fidelity each: plain epochs
        assert shares[method] == {}
    (tmp_path / "typo").mkdir()
    typo = tiny_study(tmp_path / "typo", training={"sampling": {"CCSD(T)": 0.5, "GFN2-xTB": 0.5}})
    with pytest.raises(ConfigError, match="training.sampling"):
        plan_study(load_study(typo).reduced(), data_dir, CachedReader())
