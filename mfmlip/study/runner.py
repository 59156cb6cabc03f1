"""Run a study's grid: each run in its own forked process, several at once.

A run writes ``<run>/status.json`` when it ends (``done`` with its test
metrics, or ``failed`` with the error); a run that died without one (killed,
out of memory) is recorded as failed with its exit code. Re-running the study
skips runs that are done and resumes the others from their last checkpoint.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from mfmlip.atomic_io import atomic_write
from mfmlip.study.config import StudyConfig
from mfmlip.study.plan import CachedReader, Plan, Run, plan_study
from mfmlip.study.report import write_report
from mfmlip.training.config import resolve_data_root

STATUS = "status.json"


def read_status(run: Run) -> dict | None:
    path = run.folder / STATUS
    return json.loads(path.read_text()) if path.is_file() else None


def _write_status(run: Run, status: dict) -> dict:
    status = {"run": run.name, **status}
    atomic_write(run.folder / STATUS, lambda fh: fh.write(json.dumps(status, indent=2)), mode="w")
    return status


def run_study(cfg: StudyConfig, data_root: str | Path | None = None, jobs: int | None = None) -> Path:
    """Plan the grid, run what is not done, and write the report; return its folder.

    ``jobs`` runs train at once (default ``cfg.jobs``, else one per CPU core),
    each with ``cpu_count // jobs`` threads.

    Raises
    ------
    ConfigError, DataError
        Bad study config or data (before any run starts).
    """
    reader = CachedReader()
    plan = plan_study(cfg, resolve_data_root(cfg, data_root), reader)
    print("\n".join([f"study {cfg.name}: {len(plan.runs)} runs"] + [f"  {line}" for line in plan.report]), flush=True)
    jobs = jobs or cfg.jobs or os.cpu_count() or 1
    _execute(plan, jobs, reader)
    return write_report(cfg, plan, {r.name: read_status(r) for r in plan.runs})


def _execute(plan: Plan, jobs: int, reader: CachedReader) -> None:
    status = {r.name: read_status(r) for r in plan.runs}
    pending = [r for r in plan.runs if (status[r.name] or {}).get("status") != "done"]
    status.update({r.name: None for r in pending})  # None: not finished in this study run
    print(f"{len(plan.runs) - len(pending)} runs already done; {len(pending)} to run, {jobs} at a time", flush=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running: dict[str, tuple] = {}
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        while pending or running:
            for run in list(pending):
                if len(running) >= jobs:
                    break
                dep = status.get(run.needs) if run.needs else {"status": "done"}
                if dep is None:
                    continue  # its low-level model has not finished
                pending.remove(run)
                if dep["status"] != "done":
                    status[run.name] = _write_status(run, {"status": "failed", "error": f"{run.needs} failed"})
                    continue
                process = mp.get_context("fork").Process(target=_child, args=(run, threads, reader, plan.high_fidelity))
                process.start()
                running[run.name] = (process, run, time.time())
            time.sleep(0.2)
            for name, (process, run, started) in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                del running[name]
                status[name] = read_status(run) or _write_status(
                    run, {"status": "failed", "error": f"process ended with exit code {process.exitcode}"}
                )
                print(_line(status[name], time.time() - started, plan.high_fidelity), flush=True)
    finally:
        for process, _, _ in running.values():
            process.terminate()
        signal.signal(signal.SIGTERM, previous)


def _line(status: dict, seconds: float, fidelity: str) -> str:
    if status["status"] != "done":
        return f"{status['run']}: FAILED after {seconds:.0f} s: {status['error']}"
    m = status.get("metrics", {})
    parts = [f"{q} MAE {m[q + '_mae']:.2f}" for q in ("energy", "forces") if q + "_mae" in m]
    return f"{status['run']}: done in {seconds:.0f} s" + (f"; {fidelity} test " + ", ".join(parts) if parts else "")


def _child(run: Run, threads: int, reader: CachedReader, high_fidelity: str) -> None:
    """Train one run in a forked process; its output goes to ``<run>/train.log``."""
    from mfmlip.model.serialization import read_model_file
    from mfmlip.study.select import choose_high
    from mfmlip.training.run import train

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run.folder.mkdir(parents=True, exist_ok=True)
    with open(run.folder / "train.log", "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    torch.set_num_threads(threads)
    started = time.time()
    try:
        if run.choose:
            choose_high(run, reader)
        model_path = train(run.config, resume=True, reader=reader)
        test = run.folder / "test_metrics.json"
        metrics = json.loads(test.read_text()).get(high_fidelity, {}) if test.is_file() else {}
        steps = read_model_file(model_path)["metadata"].get("steps_trained")
        _write_status(run, {"status": "done", "seconds": time.time() - started, "steps": steps, "metrics": metrics})
    except Exception as err:  # recorded; the study goes on
        traceback.print_exc()
        _write_status(run, {"status": "failed", "error": f"{type(err).__name__}: {err}",
                            "seconds": time.time() - started})
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
