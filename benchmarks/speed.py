#!/usr/bin/env python
"""Speed (and equal-budget accuracy) benchmark: mfmlip against SevenNet, MACE and NequIP.

One run measures, on this machine, with the same data and matched model sizes
(cutoff 5 Angstrom, 32 channels, lmax 2, 3 interaction layers, float32,
``--threads`` threads, 2 by default):

* training: structures/s and peak memory of a full optimiser step (energy +
  forces loss, so a double backward; Adam), batch 4 on NaCl-water boxes
  (186-194 atoms, revPBE0-D3 frames) and batch 32 on ethanol (9 atoms);
* inference: energy+forces evaluations/s of one 190-atom NaCl-water box
  through each code's own ASE calculator (a new geometry every call, so the
  neighbour list and graph are rebuilt, as in MD), and structures/s through a
  batched path (pre-built batches of 4 boxes, model only);
* for mfmlip: FLOPs per training step and per batched inference
  (``torch.utils.flop_counter``), the achieved GFLOP/s, plain float32 matmul
  GFLOP/s for comparison, and a ``torch.profiler`` table of the top ops;
* with ``--accuracy``: an equal-budget training run on the MP2 NaCl-water
  frames (same 100 training frames, epochs, batches, loss, optimiser and
  learning-rate schedule for every code) and the MP2 test force MAE on the 24
  held-out frames.

Every measurement runs in a fresh subprocess (``benchmarks/workers/*.py``);
the peers run in their own virtual environments, created on first use under
``--cache-dir`` (default ``~/.cache/mfmlip-bench/<peer>``): ``python -m venv``,
then ``pip install torch==<this interpreter's torch version>`` first (so pip
takes the local CPU build, not the CUDA wheels), then the pinned peer package.
A venv whose marker file names the same packages is reused; ``--reinstall``
rebuilds it. MACE needs its own venv anyway: mace-torch pins e3nn 0.4.4 and
installs a top-level ``tests`` package that would shadow the project's tests.

Usage::

    python benchmarks/speed.py                      # full run -> docs/benchmarks/
    python benchmarks/speed.py --accuracy           # ... plus the equal-budget accuracy run
    python benchmarks/speed.py --only accuracy      # the accuracy run alone
    python benchmarks/speed.py --quick              # smoke test -> benchmarks/out-quick/
    python benchmarks/speed.py --codes mfmlip,nequip --threads 1

Outputs in ``--out``: ``report.md`` (machine, settings, table, ratios,
targets, FLOPs, profile), ``speed.csv``, ``accuracy.csv``, ``raw.json`` (every
worker's JSON), ``profile.txt``, ``install.log`` references.
Data: ``--data-root``, else ``$MFMLIP_DATA``, else ``../shared/data`` from the
repository root (files are read in place, never copied).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"

# Peers: pinned versions (the ones this report was measured with).
PEERS = {
    "sevenn": {"pip": ["sevenn==0.13.0"], "module": "sevenn", "label": "SevenNet"},
    "mace": {"pip": ["mace-torch==0.3.16"], "module": "mace", "label": "MACE"},
    "nequip": {"pip": ["nequip==0.19.1"], "module": "nequip", "label": "NequIP"},
}
CODES = ["mfmlip", *PEERS]
# Optimisation levers, measured with --levers (mfmlip itself is not changed): "code+variant" is a model
# variant built in the worker (see workers/mfmlip_worker.py); "code@allocator" runs the worker with that
# malloc preloaded (Debian: libtcmalloc-minimal4). nequip@tcmalloc checks whether the fastest peer gains too.
LEVERS = {
    "mfmlip+merged_paths": "mfmlip, merged TP paths (lever)",
    "mfmlip@tcmalloc": "mfmlip, tcmalloc (lever)",
    "mfmlip+merged_paths@tcmalloc": "mfmlip, merged paths + tcmalloc (levers)",
    "nequip@tcmalloc": "NequIP, tcmalloc (same lever for the peer)",
}
# Further variants that can be named in --codes but are not run by --levers (measured slower, see the report).
EXTRA_VARIANTS = {
    "mfmlip+fused_tp": "mfmlip, merged paths + TP as dense products (lever, slower)",
    "mfmlip+sqrt_neighbors": "mfmlip, messages / sqrt(avg neighbours) (training lever)",
    "mfmlip+merged_paths_sqrt_neighbors": "mfmlip, merged paths + messages / sqrt(avg neighbours) (levers)",
}
ALLOCATORS = {
    "tcmalloc": ["libtcmalloc_minimal.so.4", "libtcmalloc.so.4"],
    "jemalloc": ["libjemalloc.so.2"],
}
LABELS = {"mfmlip": "mfmlip", **{k: v["label"] for k, v in PEERS.items()}, **LEVERS, **EXTRA_VARIANTS}

MODEL = {"cutoff": 5.0, "channels": 32, "lmax": 2, "layers": 3}

MEASURES = [
    # key, system, title
    ("train_nacl", "NaCl-water", "training, NaCl-water (~190 atoms), batch 4"),
    ("train_ethanol", "ethanol", "training, ethanol (9 atoms), batch 32"),
    ("infer_calc", "NaCl-water", "inference, ASE calculator, one 190-atom box"),
    ("infer_batch", "NaCl-water", "inference, batched (4 boxes), model only"),
]
TARGET = 1.5


def log(msg: str) -> None:
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# environments


def torch_spec() -> str:
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


def peer_python(peer: str, cache: Path, reinstall: bool) -> Path:
    """The python of the peer's venv, creating or reusing it."""
    venv = cache / peer
    py = venv / "bin" / "python"
    packages = [torch_spec(), *PEERS[peer]["pip"]]
    marker = venv / ".mfmlip-bench"
    if not reinstall and py.exists() and marker.exists() and marker.read_text().split() == packages:
        check = subprocess.run(
            [str(py), "-c", f"import {PEERS[peer]['module']}"], capture_output=True, text=True, cwd=tempfile.gettempdir()
        )
        if check.returncode == 0:
            log(f"{peer}: reusing {venv} ({' '.join(packages)})")
            return py
    if venv.exists():
        shutil.rmtree(venv)
    cache.mkdir(parents=True, exist_ok=True)
    install_log = cache / f"{peer}-install.log"
    log(f"{peer}: creating {venv}: python -m venv, pip install {packages[0]}, then {' '.join(packages[1:])} "
        f"(log: {install_log}; a few minutes)")
    with open(install_log, "w") as out:
        for cmd in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(py), "-m", "pip", "install", "--upgrade", "pip"],
            [str(py), "-m", "pip", "install", packages[0]],  # torch first: the CPU build, not CUDA wheels
            [str(py), "-m", "pip", "install", *packages],  # the peer, with torch held at that version
        ):
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
            if r.returncode != 0 and "--upgrade" not in cmd:
                raise RuntimeError(f"{peer}: '{' '.join(cmd)}' failed; see {install_log}")
    marker.write_text("\n".join(packages) + "\n")
    return py


def versions(py: Path, names: list[str]) -> dict:
    code = (
        "import json, importlib.metadata as m\n"
        f"out = {{}}\nfor n in {names!r}:\n"
        "    try: out[n] = m.version(n)\n"
        "    except Exception: pass\n"
        "print(json.dumps(out))"
    )
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir())
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception:
        return {}


# ---------------------------------------------------------------------------
# tasks


def data_root(arg: str | None) -> Path:
    if arg:
        return Path(arg).resolve()
    if os.environ.get("MFMLIP_DATA"):
        return Path(os.environ["MFMLIP_DATA"]).resolve()
    return (ROOT.parent / "shared" / "data").resolve()


def nacl_frames(path: Path) -> tuple[list[int], int]:
    """Indices of the 186-194-atom revPBE0-D3 boxes and of the first 190-atom box."""
    from ase.io import read

    frames = read(str(path), ":")
    sized = [i for i, a in enumerate(frames) if 186 <= len(a) <= 194]
    single = next(i for i, a in enumerate(frames) if len(a) == 190)
    return sized, single


def accuracy_split(path: Path, seed: int = 0) -> dict:
    import numpy as np
    from ase.io import read

    n = len(read(str(path), ":"))
    order = np.random.default_rng(seed).permutation(n).tolist()
    return {"test": sorted(order[:24]), "train": sorted(order[24:])}


def zero_force_mae(path: Path, frames: list[int]) -> float:
    """Force MAE (meV/A) of predicting zero forces on the given frames: where an untrained model starts."""
    import numpy as np
    from ase.io import read

    atoms = read(str(path), ":")
    return 1000 * float(np.mean(np.concatenate([np.abs(atoms[i].get_forces()).ravel() for i in frames])))


def build_tasks(args, root: Path) -> list[dict]:
    nacl = root / "nacl_water" / "revPBE0-D3.extxyz"
    ethanol = root / "ethanol" / "PBE_train.extxyz"
    mp2 = root / "nacl_water" / "MP2.extxyz"
    for p in (nacl, ethanol, mp2):
        if not p.exists():
            sys.exit(f"data file not found: {p} (set --data-root or MFMLIP_DATA)")
    q = args.quick
    reps = 2 if q else args.reps
    sized, single = nacl_frames(nacl)
    base = {"model": MODEL, "threads": args.threads, "seed": 0}
    tasks = {
        "train_nacl": dict(task="train", system="nacl", data=str(nacl), frames=sized[: 8 if q else 12],
                           batch_size=4, warmup=1 if q else 2, reps=reps, per_rep=1 if q else 2),
        "train_ethanol": dict(task="train", system="ethanol", data=str(ethanol), frames=list(range(64 if q else 128)),
                              batch_size=32, warmup=1 if q else 3, reps=reps, per_rep=1 if q else 3),
        "infer_calc": dict(task="infer_calc", system="nacl", data=str(nacl), frames=[single],
                           stats_frames=sized[:12], batch_size=1, warmup=1 if q else 3, reps=reps, per_rep=1 if q else 3),
        "infer_batch": dict(task="infer_batch", system="nacl", data=str(nacl), frames=sized[:8],
                            batch_size=4, warmup=1 if q else 2, reps=reps, per_rep=1 if q else 2),
        "flops": dict(task="flops", system="nacl", data=str(nacl), frames=sized[:4], batch_size=4,
                      reps=2 if q else 3, per_rep=1),
        "profile": dict(task="profile", system="nacl", data=str(nacl), frames=sized[:4], batch_size=4,
                        per_rep=1 if q else 2),
        "accuracy": dict(task="accuracy", system="nacl-mp2", data=str(mp2), batch_size=4,
                         accuracy={**accuracy_split(mp2), "epochs": 1 if q else args.epochs, "lr": 5e-3,
                                   "min_lr_ratio": 0.01}),
    }
    if q:
        tasks["accuracy"]["accuracy"]["train"] = tasks["accuracy"]["accuracy"]["train"][:8]
        tasks["accuracy"]["accuracy"]["test"] = tasks["accuracy"]["accuracy"]["test"][:4]
    return {k: {**base, **v, "key": k} for k, v in tasks.items()}


def find_allocator(name: str) -> str | None:
    """Path of a malloc library to LD_PRELOAD, or None if it is not installed."""
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        for lib in ALLOCATORS.get(name, []):
            if Path(d, lib).exists():
                return str(Path(d, lib))
    return None


def split_code(code: str) -> tuple[str, str, str]:
    """'mfmlip+merged_paths@tcmalloc' -> ('mfmlip', 'merged_paths', 'tcmalloc')."""
    code, _, alloc = code.partition("@")
    name, _, variant = code.partition("+")
    return name, variant, alloc


def run_worker(code: str, py: Path, task: dict, threads: int, timeout: float, logfile) -> dict:
    name, variant, alloc = split_code(code)
    script = WORKERS / f"{name}_worker.py"
    if variant:
        task = {**task, "variant": variant}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONNOUSERSITE="1",
               PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    env.pop("LD_PRELOAD", None)
    if alloc:
        lib = find_allocator(alloc)
        if lib is None:
            return {"ok": False, "code": code, "error": f"{alloc} not installed (Debian: apt-get install "
                    f"{'libtcmalloc-minimal4' if alloc == 'tcmalloc' else 'libjemalloc2'})"}
        env["LD_PRELOAD"] = lib
    payload = {k: v for k, v in task.items() if k != "key"}
    t0 = time.perf_counter()
    try:
        r = subprocess.run([str(py), str(script), json.dumps(payload)], capture_output=True, text=True,
                           timeout=timeout, cwd=tempfile.gettempdir(), env=env)
        stdout, stderr, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as err:
        stdout, stderr, rc = err.stdout or "", (err.stderr or "") + f"\nTIMEOUT after {timeout} s", -9
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
    logfile.write(f"===== {code} {task['key']} (rc {rc}, {time.perf_counter() - t0:.0f} s)\n{stderr[-4000:]}\n")
    logfile.flush()
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH_JSON "):
            result = json.loads(line[len("BENCH_JSON "):])
            result["code"] = code
            if alloc:
                result["allocator"] = env["LD_PRELOAD"]
            return result
    return {"ok": False, "code": code, "error": f"worker exited {rc}: {stderr.strip().splitlines()[-1:] or ''}"}


# ---------------------------------------------------------------------------
# machine


def machine() -> dict:
    import torch

    info = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host_cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "os": platform.platform(), "nproc": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache", "Flags"):
                v = v.strip()
                if k.strip() == "Flags":
                    v = " ".join(f for f in v.split() if f.startswith(("avx", "fma", "amx")))
                info[k.strip()] = v
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory"] = f.readline().split(":")[1].strip()
    except OSError:
        pass
    info["torch_parallel"] = torch.__config__.parallel_info().splitlines()[:6]
    return info


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its finished
    children, wall time); the difference of two snapshots gives the CPU that other processes used."""
    import resource

    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields)) / os.sysconf("SC_CLK_TCK")
    own = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))
    return busy, own, time.time()


def other_cores(start, end) -> float | None:
    """Average number of cores busy with other processes between two :func:`cpu_snapshot`s."""
    if not (start and end) or end[2] <= start[2]:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2]))


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ---------------------------------------------------------------------------
# report


def fmt(x, nd=1):
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.{nd}f}"
    return f"{x:.{nd + 1}f}"


def table_rows(results: dict, codes: list[str]) -> list[dict]:
    rows = []
    for key, system, title in MEASURES:
        for code in codes:
            r = results.get((code, key))
            if r is None:
                continue
            row = {"measure": key, "system": system, "code": code, "version": r.get("version"), "ok": r.get("ok")}
            if r.get("ok"):
                t = r["throughput"]
                row.update(unit=r["unit"], median=t["median"], min=t["min"], max=t["max"], n=t["n"],
                           rss_base_mb=r["rss_base_mb"], rss_peak_mb=r["rss_peak_mb"], rss_step_mb=r["rss_step_mb"],
                           n_params=r["n_params"], architecture=r.get("architecture", ""))
            else:
                row["error"] = r.get("error", "")
            rows.append(row)
    return rows


def write_report(out: Path, args, results: dict, accuracy: dict, extra: dict, mach: dict, meta: dict,
                 zero_mae: float | None = None) -> str:
    codes = [c for c in LABELS if c in args.codes]
    peers = [c for c in codes if c in PEERS]
    peer_levers = [c for c in codes if c not in PEERS and split_code(c)[0] in PEERS]
    mine_codes = [c for c in codes if split_code(c)[0] == "mfmlip"]
    rows = table_rows(results, codes)
    with open(out / "speed.csv", "w", newline="") as f:
        fields = ["measure", "system", "code", "version", "ok", "unit", "median", "min", "max", "n",
                  "rss_base_mb", "rss_peak_mb", "rss_step_mb", "n_params", "architecture", "error"]
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow(row)
        # the ratios too, so that the CSV alone has the answer
        for me, (key, system, _) in [(me, m) for me in mine_codes for m in MEASURES]:
            mine = results.get((me, key))
            for code in peers:
                peer = results.get((code, key))
                if mine and peer and mine.get("ok") and peer.get("ok"):
                    w.writerow({"measure": f"{key}:ratio_{me}_over_peer", "system": system, "code": code,
                                "unit": "x", "median": mine["throughput"]["median"] / peer["throughput"]["median"],
                                "rss_step_mb": mine["rss_step_mb"] / max(peer["rss_step_mb"], 1e-9),
                                "rss_peak_mb": mine["rss_peak_mb"] / peer["rss_peak_mb"]})
    if accuracy:
        with open(out / "accuracy.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["code", "version", "force_mae_meV_A", "force_rmse_meV_A", "energy_mae_meV_atom", "epochs",
                        "steps", "n_train", "n_test", "train_seconds", "n_params", "run_date_utc", "threads", "ok"])
            for code in codes:
                a = accuracy.get(code)
                if a:
                    w.writerow([code, a.get("version"), a.get("force_mae_meV_A"), a.get("force_rmse_meV_A"),
                                a.get("energy_mae_meV_atom"), a.get("epochs"), a.get("steps"), a.get("n_train"),
                                a.get("n_test"), a.get("train_seconds"), a.get("n_params"), a.get("run_date_utc"),
                                a.get("threads"), a.get("ok")])

    L = []
    L.append("# mfmlip speed benchmark (generated by `benchmarks/speed.py`)\n")
    L.append(f"Run: {mach['date_utc']}, `{' '.join(meta['argv'])}`, {meta['wall_minutes']:.1f} min in all "
             f"(peer installs: {meta['install_minutes']:.1f} min).\n")
    L.append(f"Machine: {mach.get('Model name', mach['host_cpu'])}, {mach.get('CPU(s)', mach['nproc'])} CPUs, "
             f"{mach.get('memory', '?')}, L3 {mach.get('L3 cache', '?')}, SIMD: {mach.get('Flags', '?')}; "
             f"{mach['os']}; Python {mach['python']}, torch {mach['torch']}; {args.threads} threads per measurement.\n")
    oc = meta.get("other_cores")
    L.append(f"Load average (1/5/15 min) before: {meta['load_before']}, after: {meta['load_after']} (the benchmark's "
             "own workers count in 'after'). "
             + (f"Other processes used {oc:.2f} cores on average during the run (from /proc/stat minus this run's "
                f"own CPU time){': the timings were taken under load' if meta['under_load'] else ''}.\n"
                if oc is not None else "\n"))
    L.append("Versions: " + "; ".join(f"{LABELS[c]} {v}" for c, v in meta["versions"].items()) + "\n")
    L.append("Matched size for every code: cutoff 5 A, 32 channels, lmax 2, 3 interaction layers, float32. "
             "Architectures (hidden irreps per layer) and parameter counts are in the table.\n")
    L.append("Throughput is the median over repetitions after warm-up (min-max in brackets). Memory: peak RSS of "
             "the worker process during warm-up and timed steps (`VmHWM` after resetting it with "
             "`/proc/self/clear_refs`), and in brackets that peak minus the RSS just before the first step "
             "(imports, data and model already loaded): the memory the steps themselves need.\n")
    L.append("| measure | code | throughput (median [min-max]) | peak RSS MB [step MB] | params | hidden irreps |")
    L.append("|---|---|---|---|---|---|")
    for row in rows:
        title = next(t for k, _, t in MEASURES if k == row["measure"])
        if row.get("ok"):
            L.append(f"| {title} | {LABELS[row['code']]} | {fmt(row['median'], 2)} [{fmt(row['min'], 2)}-"
                     f"{fmt(row['max'], 2)}] {row['unit']} (n={row['n']}) | {row['rss_peak_mb']:.0f} "
                     f"[{row['rss_step_mb']:.0f}] | {row['n_params']} | {row['architecture']} |")
        else:
            L.append(f"| {title} | {LABELS[row['code']]} | failed: {row.get('error', '')[:200]} | | | |")
    L.append("")
    # ratios and targets
    L.append(f"## Ratios mfmlip / peer (throughput: higher is better; memory: step MB, lower is better) and the "
             f"{TARGET}x targets\n")
    L.append("| measure | " + " | ".join(f"vs {LABELS[c]}" for c in peers) + " | vs fastest peer | target met |")
    L.append("|---|" + "---|" * len(peers) + "---|---|")
    for me, key, system, title in [(me, *m) for me in mine_codes for m in MEASURES]:
        mine = results.get((me, key))
        if not (mine and mine.get("ok")):
            continue
        if me != "mfmlip":
            title = f"{title} [{LABELS[me]}]"
        cells, best = [], None
        for code in peers:
            peer = results.get((code, key))
            if peer and peer.get("ok"):
                ratio = mine["throughput"]["median"] / peer["throughput"]["median"]
                mem = mine["rss_step_mb"] / max(peer["rss_step_mb"], 1e-9)
                cells.append(f"{ratio:.2f}x speed, {mem:.2f}x mem")
                if best is None or peer["throughput"]["median"] > best[1]["throughput"]["median"]:
                    best = (code, peer)
            else:
                cells.append("-")
        if best:
            ratio = mine["throughput"]["median"] / best[1]["throughput"]["median"]
            mem_ok = mine["rss_peak_mb"] <= best[1]["rss_peak_mb"]
            met = "yes" if ratio >= TARGET and mem_ok else "no"
            L.append(f"| {title} | " + " | ".join(cells) + f" | {ratio:.2f}x ({LABELS[best[0]]}); peak RSS "
                     f"{mine['rss_peak_mb']:.0f} vs {best[1]['rss_peak_mb']:.0f} MB | {met} |")
        else:
            L.append(f"| {title} | " + " | ".join(cells) + " | - | - |")
    L.append("")
    like = [(me, pl) for me in mine_codes for pl in peer_levers if split_code(me)[2] and split_code(me)[2] == split_code(pl)[2]]
    if like:
        L.append("Like for like: the allocator lever applied to the fastest peer as well (throughput ratio, peak RSS):\n")
        for me, pl in like:
            for key, _system, title in MEASURES:
                a, b = results.get((me, key)), results.get((pl, key))
                if a and b and a.get("ok") and b.get("ok"):
                    L.append(f"- {title}: {LABELS[me]} / {LABELS[pl]} = "
                             f"{a['throughput']['median'] / b['throughput']['median']:.2f}x, peak RSS "
                             f"{a['rss_peak_mb']:.0f} vs {b['rss_peak_mb']:.0f} MB")
        L.append("")
    # accuracy
    if accuracy:
        L.append("## Equal-budget accuracy: MP2 NaCl-water\n")
        a0 = next(iter(accuracy.values()))
        acc_run = meta.get("accuracy_run")
        if acc_run:
            oc = acc_run.get("other_cores")
            L.append(f"Accuracy run: `{' '.join(acc_run['argv'])}`, {acc_run['wall_minutes']:.1f} min, load average "
                     f"before {acc_run['load_before']}, after {acc_run['load_after']}"
                     + (f"; other processes used {oc:.2f} cores on average" if oc is not None else "") + ".\n")
        L.append(f"Same {a0.get('n_train')} MP2 training frames and {a0.get('n_test')} held-out test frames for every "
                 f"code, {a0.get('epochs')} epochs of batch 4 ({a0.get('steps')} Adam steps, lr 5e-3 with cosine decay "
                 "to 1%), loss 10 x MSE(energy per atom) + MSE(force components), least-squares E0 and force-RMS "
                 "scale from the training frames. Run: "
                 f"{a0.get('run_date_utc', '?')}, {a0.get('threads', '?')} thread(s) per code.\n")
        L.append("| code | MP2 test force MAE / RMSE (meV/A) | energy MAE (meV/atom) | training time (s) | params |")
        L.append("|---|---|---|---|---|")
        for code in codes:
            a = accuracy.get(code)
            if not a:
                continue
            if a.get("ok"):
                L.append(f"| {LABELS[code]} | {a['force_mae_meV_A']:.1f} / {a['force_rmse_meV_A']:.1f} | "
                         f"{a['energy_mae_meV_atom']:.2f} | {a['train_seconds']:.0f} | {a['n_params']} |")
            else:
                L.append(f"| {LABELS[code]} | failed: {a.get('error', '')[:200]} | | | |")
        if zero_mae is not None:
            L.append(f"\nFor scale: predicting zero forces gives a force MAE of {zero_mae:.1f} meV/A on these test frames.\n")
        best = [a["force_mae_meV_A"] for c, a in accuracy.items() if c in PEERS and a.get("ok")]
        for me in mine_codes:
            if best and accuracy.get(me, {}).get("ok"):
                r = accuracy[me]["force_mae_meV_A"] / min(best)
                L.append(f"\n{LABELS[me]} force MAE / best peer: {r:.3f} (target <= 1.05: "
                         f"{'met' if r <= 1.05 else 'missed'})\n")
    # flops
    fl = extra.get("flops")
    if fl and fl.get("ok"):
        L.append("## mfmlip FLOPs (torch.utils.flop_counter; matmul-like ops only)\n")
        L.append(f"Batch: {fl['batch_size']} NaCl-water boxes, {fl['n_atoms']} atoms, {fl['n_edges']} edges.\n")
        L.append("| pass | GFLOP per call | time per call (s) | achieved GFLOP/s | top ops (GFLOP) |")
        L.append("|---|---|---|---|---|")
        for name in ("train", "infer"):
            d = fl[name]
            top = ", ".join(f"{op.replace('aten.', '').replace('.default', '')} {v / 1e9:.2f}"
                            for op, v in d["flops_by_op"][:4])
            L.append(f"| {name} | {d['flops'] / 1e9:.2f} | {d['seconds']:.3f} | {d['gflops_per_s']:.2f} | {top} |")
        L.append("\nPlain float32 matmul on the same machine and threads (GFLOP/s): " +
                 ", ".join(f"{k} {v:.1f}" for k, v in fl["matmul_gflops"].items()) + "\n")
    tables = []
    for key, what in (("profile", "mfmlip"), ("profile_lever", LABELS["mfmlip+merged_paths@tcmalloc"])):
        pr = extra.get(key)
        if not (pr and pr.get("ok")):
            continue
        L.append(f"## Profile: {what} (torch.profiler, self CPU time per call, batch of 4 NaCl-water boxes)\n")
        for name in ("train", "infer"):
            L.append(f"{name}: " + "; ".join(f"`{e['op']}` {e['self_cpu_ms']:.0f} ms ({100 * e['share']:.0f}%, "
                                           f"{e['calls']} calls)" for e in pr[name][:8]) + "\n")
        tables += [f"== {what}: {n} ==\n{pr[n + '_table']}" for n in ("train", "infer")]
    if tables:
        (out / "profile.txt").write_text("\n\n".join(tables))
    text = "\n".join(L) + "\n"
    (out / "report.md").write_text(text)
    return text


# ---------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: few repetitions, small data; writes to benchmarks/out-quick")
    p.add_argument("--accuracy", action="store_true", help="also run the equal-budget MP2 accuracy comparison")
    p.add_argument("--only", choices=["speed", "accuracy"], help="run only the speed part or only the accuracy part")
    p.add_argument("--codes", default=",".join(CODES),
                   help=f"comma-separated subset of {CODES}, or mfmlip variants and levers: {list(LABELS)[len(CODES):]}")
    p.add_argument("--levers", action="store_true",
                   help=f"also measure the optimisation levers (mfmlip variants built in the worker: {list(LEVERS)})")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (>= 5 for the report)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the accuracy run (4 = 100 Adam steps)")
    p.add_argument("--accuracy-threads", type=int, default=None, help="threads for the accuracy runs (default --threads)")
    p.add_argument("--accuracy-parallel", type=int, default=1, help="accuracy runs at once (e.g. 2 with 1 thread each)")
    p.add_argument("--out", default=None, help="output directory (default docs/benchmarks, or benchmarks/out-quick with --quick)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "mfmlip-bench"))
    p.add_argument("--data-root", default=None)
    p.add_argument("--reinstall", action="store_true", help="rebuild the peers' virtual environments")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md and the CSVs from --out/raw.json")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    args = p.parse_args(argv)
    args.codes = [c.strip() for c in args.codes.split(",") if c.strip()]
    unknown = set(args.codes) - set(LABELS)
    if unknown:
        p.error(f"unknown codes {sorted(unknown)}; choose from {list(LABELS)}")
    if args.levers:
        args.codes += [c for c in LEVERS if c not in args.codes]
    do_speed = args.only != "accuracy"
    do_acc = args.accuracy or args.only == "accuracy"
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "out-quick" if args.quick else ROOT / "docs" / "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        raw = json.loads((out / "raw.json").read_text())
        results = {(r.get("code"), r.get("measure")): r for r in raw.get("speed", [])}
        args.codes = [c for c in LABELS if any(k[0] == c for k in results) or c in raw.get("accuracy", {})]
        if raw.get("accuracy") and "accuracy_zero_force_mae" not in raw:
            tasks = build_tasks(args, data_root(args.data_root))
            raw["accuracy_zero_force_mae"] = zero_force_mae(Path(tasks["accuracy"]["data"]),
                                                            tasks["accuracy"]["accuracy"]["test"])
            (out / "raw.json").write_text(json.dumps(raw, indent=1, default=str))
        print(write_report(out, args, results, raw.get("accuracy", {}), raw.get("extra", {}), raw["machine"],
                           raw["meta"], raw.get("accuracy_zero_force_mae")))
        return 0
    t_start = time.perf_counter()
    meta = {"argv": ["python", "benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])],
            "load_before": loadavg()}
    cpu0 = cpu_snapshot()
    mach = machine()
    log(f"machine: {mach.get('Model name', '?')}, load {meta['load_before']}; output -> {out}")

    root = data_root(args.data_root)
    tasks = build_tasks(args, root)
    cache = Path(args.cache_dir).expanduser()
    t_inst = time.perf_counter()
    pythons = {"mfmlip": Path(sys.executable)}
    for code in args.codes:
        if code in PEERS:
            pythons[code] = peer_python(code, cache, args.reinstall)
    for code in args.codes:
        if code not in pythons:
            pythons[code] = pythons.get(split_code(code)[0]) or peer_python(split_code(code)[0], cache, args.reinstall)
    meta["install_minutes"] = (time.perf_counter() - t_inst) / 60
    meta["versions"] = {}
    for code in [c for c in args.codes if c in CODES]:
        names = ["torch", "e3nn", "ase"] + ([PEERS[code]["pip"][0].split("==")[0]] if code in PEERS else [])
        v = versions(pythons[code], names)
        meta["versions"][code] = ", ".join(f"{k} {x}" for k, x in v.items())

    raw_path = out / "raw.json"
    previous = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    raw = {"speed": previous.get("speed", []), "accuracy": previous.get("accuracy", {}), "extra": previous.get("extra", {})}
    results, extra = {}, {}
    logfile = open(out / "workers.log", "a")
    if do_speed:
        raw["speed"], raw["extra"] = [], {}
        for key, system, title in MEASURES:
            for code in args.codes:  # codes interleaved per measure, so a load change hits all alike
                log(f"{title}: {code} ...")
                r = run_worker(code, pythons[code], tasks[key], args.threads, args.timeout, logfile)
                r["measure"] = key
                results[(code, key)] = r
                raw["speed"].append(r)
                if r.get("ok"):
                    t = r["throughput"]
                    log(f"  {t['median']:.3f} {r['unit']} [{t['min']:.3f}-{t['max']:.3f}], peak RSS "
                        f"{r['rss_peak_mb']:.0f} MB (steps {r['rss_step_mb']:.0f} MB)")
                else:
                    log(f"  FAILED: {r.get('error')}")
        if "mfmlip" in args.codes:
            for key in ("flops", "profile"):
                log(f"mfmlip {key} ...")
                extra[key] = run_worker("mfmlip", pythons["mfmlip"], tasks[key], args.threads, args.timeout, logfile)
            if args.levers:
                lever = "mfmlip+merged_paths@tcmalloc"
                log(f"{lever} profile ...")
                extra["profile_lever"] = run_worker(lever, pythons[lever], tasks["profile"], args.threads, args.timeout,
                                                    logfile)
            raw["extra"] = extra
    else:
        for r in raw["speed"]:
            results[(r.get("code"), r.get("measure"))] = r
        extra = raw["extra"]
    if do_acc:
        from concurrent.futures import ThreadPoolExecutor

        threads = args.accuracy_threads or args.threads
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

        def one(code):
            log(f"accuracy: {code} ({tasks['accuracy']['accuracy']['epochs']} epochs) ...")
            r = run_worker(code, pythons[code], {**tasks["accuracy"], "threads": threads}, threads, args.timeout * 4,
                           logfile)
            r.update(run_date_utc=stamp, threads=threads)
            log(f"  {code}: force MAE {r.get('force_mae_meV_A', float('nan')):.1f} meV/A" if r.get("ok")
                else f"  {code}: FAILED {r.get('error')}")
            return code, r

        raw["accuracy_zero_force_mae"] = zero_force_mae(Path(tasks["accuracy"]["data"]),
                                                        tasks["accuracy"]["accuracy"]["test"])
        with ThreadPoolExecutor(max_workers=max(1, args.accuracy_parallel)) as pool:
            for code, r in pool.map(one, [c for c in args.codes if "@" not in c]):  # allocators: same numbers
                raw["accuracy"][code] = r
    accuracy = raw["accuracy"]
    meta["load_after"] = loadavg()
    meta["other_cores"] = other_cores(cpu0, cpu_snapshot())
    meta["under_load"] = meta["other_cores"] is not None and meta["other_cores"] > 0.2
    meta["wall_minutes"] = (time.perf_counter() - t_start) / 60
    if do_speed:
        raw["machine"], raw["meta"] = mach, meta
    else:  # the report's header describes the run that measured the speeds
        raw.setdefault("machine", mach)
        raw.setdefault("meta", meta)
        raw["meta"]["accuracy_run"] = {k: meta[k] for k in ("argv", "load_before", "load_after", "wall_minutes",
                                                            "other_cores")}
    raw_path.write_text(json.dumps(raw, indent=1, default=str))
    text = write_report(out, args, results, accuracy, extra, raw["machine"], raw["meta"],
                        raw.get("accuracy_zero_force_mae"))
    print("\n" + text)
    log(f"wrote {out / 'report.md'}, {out / 'speed.csv'}" + (f", {out / 'accuracy.csv'}" if accuracy else "")
        + f" in {meta['wall_minutes']:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
