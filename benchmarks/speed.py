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

Allocators: ``mfmlip`` runs as its ``mfmlip`` command does, with tcmalloc
preloaded when ``mfmlip.cli.allocator.find_tcmalloc`` finds it
(``MFMLIP_ALLOCATOR=system`` in the environment turns that off); the peers
run with glibc malloc, as they do by default. ``CODE@system`` and
``CODE@tcmalloc`` force one or the other; ``--levers`` adds
``mfmlip@system`` and ``nequip@tcmalloc`` so that like for like stays
visible. Every worker reports the malloc actually mapped into it, and the
report gives it per row.

Compiled paths: ``CODE+compile`` (``mfmlip+compile``, ``nequip+compile``, with
an allocator too: ``mfmlip+compile@system``) runs the code's compiled path:
for mfmlip :class:`mfmlip.model.compiled.CompiledPotential` (training as
``training.compile: true``; inference through its eval-mode graphs), for
NequIP its ``compile_mode="compile"`` in training and AOTInductor
(``nequip-compile --mode aotinductor``) in inference. The warm-up's first call
holds the trace and compile; its seconds are in the raw results
(``first_call_s``, and ``one_off`` for a compile outside the timed calls).
Every worker compiles with an empty Inductor cache of its own, in its own
process (``TORCHINDUCTOR_COMPILE_THREADS=1``), as on a fresh machine.
``--levers`` adds these too, and the report compares like with like: eager
against eager, compiled against compiled, same allocator.

Every measurement runs in a fresh subprocess (``benchmarks/workers/*.py``);
the peers run in their own virtual environments, created on first use under
``--cache-dir`` (default ``~/.cache/mfmlip-bench/<peer>``): ``python -m venv``,
then ``pip install torch==<this interpreter's torch version>`` first (so pip
takes the local CPU build, not the CUDA wheels), then the pinned peer package.
A venv whose marker file names the same packages is reused; ``--reinstall``
rebuilds it. MACE needs its own venv anyway: mace-torch pins e3nn 0.4.4 and
installs a top-level ``tests`` package that would shadow the project's tests.

Usage::

    python benchmarks/speed.py --levers             # full speed run -> docs/benchmarks/
    python benchmarks/speed.py --codes mfmlip,mfmlip+compile,nequip,nequip+compile --merge   # eager and compiled
    python benchmarks/speed.py --only accuracy      # the accuracy run alone (keeps the speed rows)
    python benchmarks/speed.py --codes mfmlip,mfmlip@system --accuracy --merge   # re-measure mfmlip only
    python benchmarks/speed.py --report-only        # rewrite report.md and the CSVs from raw.json
    python benchmarks/speed.py --quick              # smoke test -> benchmarks/out-quick/

Without ``--merge`` a run replaces the part it measures (speed rows, or
accuracy rows) in ``--out/raw.json``; with ``--merge`` it replaces only the
rows of the codes it measures and keeps the others. Every row records when,
in which run and with which allocator it was measured, and the report says so.

Outputs in ``--out``: ``report.md`` (machine, runs, table, ratios, targets,
FLOPs, profile), ``speed.csv``, ``accuracy.csv``, ``raw.json`` (every
worker's JSON and the runs), ``profile.txt``, ``workers.log`` (appended).
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
COMPILE = "+compile"  # "code+compile": that code's compiled path (module docstring); these codes have one
COMPILED = ("mfmlip", "nequip")
# "code@allocator": that code's worker with glibc malloc ("system") or tcmalloc preloaded. --levers adds these:
# mfmlip with the allocator its command would not use, the fastest peer with mfmlip's, and both compiled.
LEVERS = ["mfmlip@system", "nequip@tcmalloc", "mfmlip+compile", "nequip+compile"]
ALLOCATOR_ENV = "MFMLIP_ALLOCATOR"  # as for the mfmlip command: "system" runs plain mfmlip without tcmalloc

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


def utc_now(seconds: bool = False) -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M" + (":%S" if seconds else "") + " UTC")


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


# ---------------------------------------------------------------------------
# codes, allocators, workers


def split_code(code: str) -> tuple[str, str]:
    """The worker's code and the allocator: 'nequip+compile@tcmalloc' -> ('nequip', 'tcmalloc'); 'mfmlip' ->
    ('mfmlip', '')."""
    name, _, alloc = code.partition("@")
    return name.removesuffix(COMPILE), alloc


def compiled(code: str) -> bool:
    """'mfmlip+compile', 'nequip+compile@tcmalloc': the code's compiled path."""
    return code.partition("@")[0].endswith(COMPILE)


def known_code(code: str) -> bool:
    """A code, or a code with the allocator it does not use by default (mfmlip@system, <peer>@tcmalloc),
    either of them compiled if the code has a compiled path (mfmlip+compile, nequip+compile@tcmalloc)."""
    name, alloc = split_code(code)
    return (name in CODES and alloc in ("", "system" if name == "mfmlip" else "tcmalloc")
            and (not compiled(code) or name in COMPILED))


def label(code: str) -> str:
    name, alloc = split_code(code)
    return (PEERS[name]["label"] if name in PEERS else name) + COMPILE * compiled(code) + (f"@{alloc}" if alloc else "")


def ordered(codes) -> list[str]:
    """Codes as the code runs by default first (mfmlip, then the peers), then the compiled rows, then the
    allocator rows."""
    return sorted(set(codes), key=lambda c: (bool(split_code(c)[1]), compiled(c), CODES.index(split_code(c)[0]), c))


def find_tcmalloc() -> str | None:
    """tcmalloc as the ``mfmlip`` command finds it (:func:`mfmlip.cli.allocator.find_tcmalloc`), or None."""
    if str(ROOT) not in sys.path:
        sys.path.insert(1, str(ROOT))
    from mfmlip.cli.allocator import find_tcmalloc as find

    return find()


def preload(code: str) -> tuple[str | None, str | None]:
    """(library to LD_PRELOAD or None, error) for the code's worker."""
    name, alloc = split_code(code)
    if alloc == "system" or (not alloc and (name != "mfmlip" or os.environ.get(ALLOCATOR_ENV) == "system")):
        return None, None
    lib = find_tcmalloc()
    if lib is None and alloc == "tcmalloc":
        return None, "tcmalloc not installed (Debian: apt-get install libtcmalloc-minimal4)"
    return lib, None  # plain mfmlip without tcmalloc installed: glibc, as its command runs


def run_worker(code: str, py: Path, task: dict, threads: int, timeout: float, logfile, run_id: str) -> dict:
    name, _ = split_code(code)
    stamp = {"code": code, "run": run_id, "measured_utc": utc_now()}
    script = WORKERS / f"{name}_worker.py"
    lib, error = preload(code)
    if error:
        return {"ok": False, "error": error, **stamp}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "LD_PRELOAD")}
    # a scratch directory of the worker's own, removed after it: its temporary files and, for compiled paths, an
    # empty Inductor cache (a fresh machine's compile); compiled in the worker's process (a pool of compile
    # workers slows every later step: docs/benchmarks/compile.md)
    scratch = tempfile.mkdtemp(prefix="bench-worker-")
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONNOUSERSITE="1",
               PYTHONWARNINGS="ignore", TQDM_DISABLE="1", TMPDIR=scratch,
               TORCHINDUCTOR_CACHE_DIR=os.path.join(scratch, "inductor"), TORCHINDUCTOR_COMPILE_THREADS="1")
    if lib:
        env["LD_PRELOAD"] = lib
    payload = {**{k: v for k, v in task.items() if k != "key"}, "compile": compiled(code)}
    t0 = time.perf_counter()
    try:
        r = subprocess.run([str(py), str(script), json.dumps(payload)], capture_output=True, text=True,
                           timeout=timeout, cwd=tempfile.gettempdir(), env=env)
        stdout, stderr, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as err:
        stdout, stderr, rc = err.stdout or "", (err.stderr or "") + f"\nTIMEOUT after {timeout} s", -9
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logfile.write(f"===== {code} {task['key']} ({stamp['measured_utc']}, LD_PRELOAD={lib or '-'}, rc {rc}, "
                  f"{time.perf_counter() - t0:.0f} s)\n{stderr[-4000:]}\n")
    logfile.flush()
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH_JSON "):
            return {**json.loads(line[len("BENCH_JSON "):]), **stamp, "preload": lib or ""}
    return {"ok": False, "error": f"worker exited {rc}: {stderr.strip().splitlines()[-1:] or ''}", **stamp}


def malloc_of(r: dict) -> str:
    """The allocator a row was measured with: what its worker found mapped ("malloc"); rows of the first
    report only have the preloaded path ("allocator"), and none when they ran with glibc."""
    found = r.get("malloc") or r.get("allocator") or "glibc"
    return next((n for n in ("tcmalloc", "jemalloc") if n in found), "glibc")


# ---------------------------------------------------------------------------
# raw.json: rows, runs, merging

RUN_KEYS = ("argv", "codes", "parts", "cpu", "wall_minutes", "install_minutes", "load_before", "load_after",
            "other_cores", "under_load")


def load_raw(path: Path) -> tuple[dict, list[str]]:
    """``raw.json`` in the current layout (empty if missing) and the codes whose rows were dropped.

    Rows of codes this script no longer runs (the first report's worker-side model variants, and
    ``mfmlip@tcmalloc``, now plain ``mfmlip``) are dropped. A file of the first layout (one ``meta`` for
    the last run, no per-row dates) is converted: that run becomes ``runs[0]``; its accuracy rows point
    to it; its speed rows too if it measured speed, else they are dated "before" its start.
    """
    raw = json.loads(path.read_text()) if path.exists() else {}
    for key, empty in (("speed", []), ("accuracy", {}), ("extra", {}), ("versions", {}), ("runs", [])):
        raw.setdefault(key, empty)
    if "meta" in raw:
        meta = raw.pop("meta")
        run_id = raw.get("machine", {}).get("date_utc", "?")
        raw["versions"] = {**meta.get("versions", {}), **raw["versions"]}
        raw["runs"].insert(0, {"id": run_id, **{k: meta.get(k) for k in RUN_KEYS}})
        for a in raw["accuracy"].values():
            if a.get("run_date_utc") and "run" not in a:
                a.update(measured_utc=a["run_date_utc"], run=run_id if a["run_date_utc"] == run_id else None)
        argv = meta.get("argv") or []
        accuracy_only = "--only" in argv[:-1] and argv[argv.index("--only") + 1] == "accuracy"
        for r in raw["speed"]:
            if "measured_utc" in r:
                continue
            if accuracy_only:
                r["measured_utc"] = f"before {run_id}"
            else:
                r.update(run=run_id, measured_utc=run_id)
    dropped = sorted({str(r.get("code")) for r in raw["speed"] if not known_code(str(r.get("code")))}
                     | {c for c in raw["accuracy"] if not known_code(c)})
    raw["speed"] = [r for r in raw["speed"] if known_code(str(r.get("code")))]
    raw["accuracy"] = {c: a for c, a in raw["accuracy"].items() if known_code(c)}
    raw["extra"] = {k: v for k, v in raw["extra"].items() if k in ("flops", "profile")}
    return raw, dropped


def measured(r: dict) -> str:
    return r.get("measured_utc") or "not recorded"


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
            row = {"measure": key, "system": system, "code": code, "version": r.get("version"), "ok": r.get("ok"),
                   "allocator": malloc_of(r), "measured_utc": measured(r), "run": r.get("run")}
            if r.get("ok"):
                t = r["throughput"]
                row.update(unit=r["unit"], median=t["median"], min=t["min"], max=t["max"], n=t["n"],
                           threads=r.get("threads"), rss_base_mb=r["rss_base_mb"], rss_peak_mb=r["rss_peak_mb"],
                           rss_step_mb=r["rss_step_mb"], n_params=r["n_params"], architecture=r.get("architecture", ""))
            else:
                row["error"] = r.get("error", "")
            rows.append(row)
    return rows


def ok(r) -> bool:
    return bool(r and r.get("ok"))


def like_for_like(results: dict, codes: list[str], me: str, key: str) -> tuple[str | None, str | None]:
    """The fastest peer rows of measure ``key`` with ``me``'s allocator: (in ``me``'s mode, eager or compiled;
    in either mode), each a code or None."""
    a = results.get((me, key))
    same = [c for c in codes if split_code(c)[0] in PEERS and ok(a) and ok(results.get((c, key)))
            and malloc_of(results[(c, key)]) == malloc_of(a)]

    def fastest(cs):
        return max(cs, key=lambda c: results[(c, key)]["throughput"]["median"]) if cs else None

    return fastest([c for c in same if compiled(c) == compiled(me)]), fastest(same)


def verdict(ratio: float) -> str:
    """The throughput ratio against the target: met by how much above it, or missed by how much below."""
    return f"met (+{ratio / TARGET - 1:.0%})" if ratio >= TARGET else f"missed by {1 - ratio / TARGET:.0%}"


def one_off_s(r: dict) -> float | None:
    """Seconds a row paid once (its first warm-up call, plus compiles outside the timed calls); None if the
    row does not record it."""
    return None if "first_call_s" not in r else r["first_call_s"] + sum((r.get("one_off") or {}).values())


def write_report(out: Path, raw: dict) -> str:
    results = {(r.get("code"), r.get("measure")): r for r in raw["speed"]}
    accuracy, extra, mach = raw["accuracy"], raw["extra"], raw.get("machine", {})
    codes = ordered([c for c, _ in results] + list(accuracy))
    peers = [c for c in codes if c in PEERS]
    mine_codes = [c for c in codes if split_code(c)[0] == "mfmlip"]
    rows = table_rows(results, codes)
    with open(out / "speed.csv", "w", newline="") as f:
        fields = ["measure", "system", "code", "allocator", "version", "measured_utc", "run", "ok", "unit", "median",
                  "min", "max", "n", "threads", "rss_base_mb", "rss_peak_mb", "rss_step_mb", "n_params",
                  "architecture", "error"]
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow(row)
        # the ratios too, so that the CSV alone has the answer
        for me, (key, system, _) in [(me, m) for me in mine_codes for m in MEASURES]:
            mine = results.get((me, key))
            same_mode = like_for_like(results, codes, me, key)[0]
            for code, kind in [(c, "ratio") for c in peers] + [(same_mode, "like_for_like")] * bool(same_mode):
                peer = results.get((code, key))
                if ok(mine) and ok(peer):
                    w.writerow({"measure": f"{key}:{kind}_{me}_over_peer", "system": system, "code": code,
                                "unit": "x", "median": mine["throughput"]["median"] / peer["throughput"]["median"],
                                "rss_step_mb": mine["rss_step_mb"] / max(peer["rss_step_mb"], 1e-9),
                                "rss_peak_mb": mine["rss_peak_mb"] / peer["rss_peak_mb"]})
    if accuracy:
        with open(out / "accuracy.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["code", "allocator", "version", "force_mae_meV_A", "force_rmse_meV_A", "energy_mae_meV_atom",
                        "epochs", "steps", "n_train", "n_test", "train_seconds", "n_params", "measured_utc", "run",
                        "threads", "ok"])
            for code in codes:
                a = accuracy.get(code)
                if a:
                    w.writerow([code, malloc_of(a), a.get("version"), a.get("force_mae_meV_A"),
                                a.get("force_rmse_meV_A"), a.get("energy_mae_meV_atom"), a.get("epochs"),
                                a.get("steps"), a.get("n_train"), a.get("n_test"), a.get("train_seconds"),
                                a.get("n_params"), measured(a), a.get("run"), a.get("threads"), a.get("ok")])

    L = ["# mfmlip speed benchmark (generated by `benchmarks/speed.py`)\n"]
    threads = sorted({r.get("threads") for r in raw["speed"] if r.get("threads")})
    L.append(f"Machine: {mach.get('Model name', mach.get('host_cpu', '?'))}, {mach.get('CPU(s)', mach.get('nproc'))} "
             f"CPUs, {mach.get('memory', '?')}, L3 {mach.get('L3 cache', '?')}, SIMD: {mach.get('Flags', '?')}; "
             f"{mach.get('os', '?')}; Python {mach.get('python', '?')}, torch {mach.get('torch', '?')}; "
             f"threads per speed measurement: {'/'.join(map(str, threads)) or '?'}.\n")
    used = {r.get("run") for r in raw["speed"]} | {a.get("run") for a in accuracy.values()}
    L.append("Runs whose rows are in this report (each row says when it was measured; later runs replaced the "
             "rows of the codes they measured, `--merge`). Load: the 1/5/15-min load average before and after the "
             "run (its own workers count in 'after'), and the cores other processes used on average (from "
             "/proc/stat minus the run's own CPU time):\n")
    for run in raw["runs"]:
        if run["id"] not in used:
            continue
        oc = run.get("other_cores")
        L.append(f"- {run['id']}: `{' '.join(run.get('argv') or ['?'])}`, {run.get('wall_minutes') or 0:.1f} min"
                 + (f" (peer installs {run['install_minutes']:.1f} min)" if run.get("install_minutes") else "")
                 + f"; load before {run.get('load_before')}, after {run.get('load_after')}"
                 + (f"; other processes {oc:.2f} cores" if oc is not None else "")
                 + ("; **the timings were taken under load**" if run.get("under_load") else ""))
    if any(r.get("run") is None for r in [*raw["speed"], *accuracy.values()]):
        L.append("- rows measured 'before X' come from an earlier run whose details were not recorded; X is "
                 "the start of a later run that kept them")
    cpus = {run.get("cpu") for run in raw["runs"] if run["id"] in used and run.get("cpu")}
    if len(cpus) > 1:
        L.append(f"- **the runs were on different CPUs** ({', '.join(sorted(cpus))}): ratios across runs mean little")
    L.append("")
    names = {split_code(c)[0] for c in codes}
    L.append("Versions: " + "; ".join(f"{label(c)} {v}" for c, v in raw["versions"].items() if c in names) + "\n")
    L.append("Matched size for every code: cutoff 5 A, 32 channels, lmax 2, 3 interaction layers, float32. "
             "Architectures (hidden irreps per layer) and parameter counts are in the table.\n")
    L.append("Allocator: the malloc mapped into the worker process. mfmlip runs as its `mfmlip` command does, "
             "with tcmalloc preloaded when it is installed (`mfmlip.cli.allocator`); the peers run with glibc "
             "malloc, as they do by default; `CODE@ALLOCATOR` rows force the other one.\n")
    L.append("Throughput is the median over repetitions after warm-up (min-max in brackets). Memory: peak RSS of "
             "the worker process during warm-up and timed steps (`VmHWM` after resetting it with "
             "`/proc/self/clear_refs`), and in brackets that peak minus the RSS just before the first step "
             "(imports, data and model already loaded): the memory the steps themselves need.\n")
    L.append("| measure | code | allocator | throughput (median [min-max]) | peak RSS MB [step MB] | params | "
             "hidden irreps | version | measured |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        title = next(t for k, _, t in MEASURES if k == row["measure"])
        head = f"| {title} | {label(row['code'])} | {row['allocator']} |"
        tail = f" {row['version'] or ''} | {row['measured_utc']} |"
        if row.get("ok"):
            L.append(f"{head} {fmt(row['median'], 2)} [{fmt(row['min'], 2)}-{fmt(row['max'], 2)}] {row['unit']} "
                     f"(n={row['n']}) | {row['rss_peak_mb']:.0f} [{row['rss_step_mb']:.0f}] | {row['n_params']} | "
                     f"{row['architecture']} |{tail}")
        else:
            L.append(f"{head} failed: {row.get('error', '')[:200]} | | | |{tail}")
    L.append("")
    # ratios and targets
    L.append(f"## Ratios mfmlip / peer (throughput: higher is better; memory: step MB, lower is better) and the "
             f"{TARGET}x targets\n")
    L.append("Each mfmlip row (with its allocator) against the peers as they run by default (eager; against the "
             "compiled peers in the like-for-like table below).\n")
    L.append("| measure | " + " | ".join(f"vs {label(c)}" for c in peers) + " | vs fastest peer | target met |")
    L.append("|---|" + "---|" * len(peers) + "---|---|")
    for me, key, system, title in [(me, *m) for me in mine_codes for m in MEASURES]:
        mine = results.get((me, key))
        if not ok(mine):
            continue
        title = f"{title} [{label(me)}, {malloc_of(mine)}]"
        cells, best = [], None
        for code in peers:
            peer = results.get((code, key))
            if ok(peer):
                ratio = mine["throughput"]["median"] / peer["throughput"]["median"]
                mem = mine["rss_step_mb"] / max(peer["rss_step_mb"], 1e-9)
                cells.append(f"{ratio:.2f}x speed, {mem:.2f}x mem")
                if best is None or peer["throughput"]["median"] > best[1]["throughput"]["median"]:
                    best = (code, peer)
            else:
                cells.append("-")
        if best:
            ratio = mine["throughput"]["median"] / best[1]["throughput"]["median"]
            met = "yes" if ratio >= TARGET and mine["rss_peak_mb"] <= best[1]["rss_peak_mb"] else "no"
            L.append(f"| {title} | " + " | ".join(cells) + f" | {ratio:.2f}x ({label(best[0])}); peak RSS "
                     f"{mine['rss_peak_mb']:.0f} vs {best[1]['rss_peak_mb']:.0f} MB | {met} |")
        else:
            L.append(f"| {title} | " + " | ".join(cells) + " | - | - |")
    L.append("")
    like = []
    for me, key, title in [(me, k, t) for me in mine_codes for k, _, t in MEASURES]:
        a, pair = results.get((me, key)), like_for_like(results, codes, me, key)
        if not any(pair):
            continue
        cells = []
        for c in pair:
            ratio = c and a["throughput"]["median"] / results[(c, key)]["throughput"]["median"]
            cells += [f"{ratio:.2f}x ({label(c)})", verdict(ratio)] if c else ["-", "-"]
        b = results[(pair[0] or pair[1], key)]
        like.append(f"| {title} | {label(me)} | {malloc_of(a)} | " + " | ".join(cells) + f" | {a['rss_peak_mb']:.0f} / "
                    f"{b['rss_peak_mb']:.0f} | {fmt(one_off_s(a))} / {fmt(one_off_s(b))} |")
    if like:
        L.append(f"## Like for like and the {TARGET}x target\n")
        L.append("Each mfmlip row against the fastest peer row with the same allocator, in the same mode (eager "
                 "against eager, compiled against compiled: `+compile`) and in either mode. 'met (+X %)' or "
                 f"'missed by X %': how far the throughput ratio is above or below {TARGET}x. Peak RSS is "
                 "against the same-mode row. One-off: seconds of the first warm-up call (for a compiled path the "
                 "trace and compile happen in it) plus any compile outside the timed calls (NequIP's AOTInductor "
                 "build of its calculator), not in the throughput.\n")
        L.append("| measure | mfmlip row | allocator | vs same mode | target | vs fastest peer row | target | "
                 "peak RSS MB (mfmlip / peer) | one-off s (mfmlip / peer) |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        L += like + [""]
    # accuracy
    if accuracy:
        L.append("## Equal-budget accuracy: MP2 NaCl-water\n")
        a0 = next((a for a in accuracy.values() if a.get("ok")), {})
        L.append(f"Same {a0.get('n_train')} MP2 training frames and {a0.get('n_test')} held-out test frames for every "
                 f"code, {a0.get('epochs')} epochs of batch 4 ({a0.get('steps')} Adam steps, lr 5e-3 with cosine decay "
                 "to 1%), loss 10 x MSE(energy per atom) + MSE(force components), least-squares E0 and force-RMS "
                 "scale from the training frames. The allocator changes the training time, not the numbers.\n")
        L.append("| code | allocator | MP2 test force MAE / RMSE (meV/A) | energy MAE (meV/atom) | training time (s) "
                 "| threads | params | version | measured |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for code in codes:
            a = accuracy.get(code)
            if not a:
                continue
            head = f"| {label(code)} | {malloc_of(a)} |"
            tail = f" {a.get('version', '')} | {measured(a)} |"
            if a.get("ok"):
                L.append(f"{head} {a['force_mae_meV_A']:.1f} / {a['force_rmse_meV_A']:.1f} | "
                         f"{a['energy_mae_meV_atom']:.2f} | {a['train_seconds']:.0f} | {a.get('threads', '?')} | "
                         f"{a['n_params']} |{tail}")
            else:
                L.append(f"{head} failed: {a.get('error', '')[:200]} | | | | |{tail}")
        zero_mae = raw.get("accuracy_zero_force_mae")
        if zero_mae is not None:
            L.append(f"\nFor scale: predicting zero forces gives a force MAE of {zero_mae:.1f} meV/A on these test frames.\n")
        best = [a["force_mae_meV_A"] for c, a in accuracy.items() if c in PEERS and a.get("ok")]
        for me in mine_codes:
            if best and ok(accuracy.get(me)):
                r = accuracy[me]["force_mae_meV_A"] / min(best)
                L.append(f"\n{label(me)} force MAE / best peer: {r:.3f} (target <= 1.05: "
                         f"{'met' if r <= 1.05 else 'missed'})\n")
    # flops
    fl = extra.get("flops")
    if ok(fl):
        L.append("## mfmlip FLOPs (torch.utils.flop_counter; matmul-like ops only)\n")
        L.append(f"Batch: {fl['batch_size']} NaCl-water boxes, {fl['n_atoms']} atoms, {fl['n_edges']} edges; "
                 f"mfmlip {fl.get('version', '')}, {malloc_of(fl)}, measured {measured(fl)}.\n")
        L.append("| pass | GFLOP per call | time per call (s) | achieved GFLOP/s | top ops (GFLOP) |")
        L.append("|---|---|---|---|---|")
        for name in ("train", "infer"):
            d = fl[name]
            top = ", ".join(f"{op.replace('aten.', '').replace('.default', '')} {v / 1e9:.2f}"
                            for op, v in d["flops_by_op"][:4])
            L.append(f"| {name} | {d['flops'] / 1e9:.2f} | {d['seconds']:.3f} | {d['gflops_per_s']:.2f} | {top} |")
        L.append("\nPlain float32 matmul on the same machine and threads (GFLOP/s): " +
                 ", ".join(f"{k} {v:.1f}" for k, v in fl["matmul_gflops"].items()) + "\n")
    pr = extra.get("profile")
    if ok(pr):
        what = f"mfmlip {pr.get('version', '')}, {malloc_of(pr)}, measured {measured(pr)}"
        L.append(f"## Profile: {what} (torch.profiler, self CPU time per call, batch of 4 NaCl-water boxes)\n")
        for name in ("train", "infer"):
            L.append(f"{name}: " + "; ".join(f"`{e['op']}` {e['self_cpu_ms']:.0f} ms ({100 * e['share']:.0f}%, "
                                           f"{e['calls']} calls)" for e in pr[name][:8]) + "\n")
        (out / "profile.txt").write_text("\n\n".join(f"== {what}: {n} ==\n{pr[n + '_table']}"
                                                     for n in ("train", "infer")))
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
                   help=f"comma-separated subset of {CODES}; CODE@ALLOCATOR forces the allocator a code does not "
                        "use by default: mfmlip@system (glibc malloc), <peer>@tcmalloc; CODE+compile (before any "
                        f"@ALLOCATOR) runs the compiled path of {', '.join(COMPILED)}")
    p.add_argument("--levers", action="store_true",
                   help=f"also measure {LEVERS}: mfmlip with glibc malloc, the fastest peer with tcmalloc, and "
                        "both compiled")
    p.add_argument("--merge", action="store_true",
                   help="replace only the measured codes' rows in --out/raw.json and keep the other codes' rows "
                        "(without it, the part that runs replaces all its rows)")
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
    codes = [c.strip() for c in args.codes.split(",") if c.strip()]
    unknown = [c for c in codes if not known_code(c)]
    if unknown:
        p.error(f"unknown codes {unknown}; choose from {CODES}, mfmlip@system, <peer>@tcmalloc, "
                f"{'/'.join(COMPILED)}+compile[@ALLOCATOR]")
    codes = ordered(codes + (LEVERS if args.levers else []))
    do_speed = args.only != "accuracy"
    do_acc = args.accuracy or args.only == "accuracy"
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "out-quick" if args.quick else ROOT / "docs" / "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / "raw.json"
    raw, dropped = load_raw(raw_path)
    if dropped:
        log(f"{raw_path}: dropping the rows of codes this script no longer runs: {', '.join(dropped)}")
    if args.report_only:
        if raw["accuracy"] and "accuracy_zero_force_mae" not in raw:
            tasks = build_tasks(args, data_root(args.data_root))
            raw["accuracy_zero_force_mae"] = zero_force_mae(Path(tasks["accuracy"]["data"]),
                                                            tasks["accuracy"]["accuracy"]["test"])
            raw_path.write_text(json.dumps(raw, indent=1, default=str))
        print(write_report(out, raw))
        return 0
    t_start = time.perf_counter()
    run_id = utc_now(seconds=True)
    run = {"id": run_id, "argv": ["python", "benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])],
           "codes": codes, "parts": ["speed"] * do_speed + ["accuracy"] * do_acc, "load_before": loadavg()}
    cpu0 = cpu_snapshot()
    mach = machine()
    run["cpu"] = mach.get("Model name", mach["host_cpu"])
    log(f"machine: {run['cpu']}, load {run['load_before']}; codes {', '.join(codes)}; output -> {out}"
        + (" (merged into the existing rows)" if args.merge else ""))

    tasks = build_tasks(args, data_root(args.data_root))
    cache = Path(args.cache_dir).expanduser()
    t_inst = time.perf_counter()
    pythons = {}
    for name in dict.fromkeys(split_code(c)[0] for c in codes):
        pythons[name] = Path(sys.executable) if name == "mfmlip" else peer_python(name, cache, args.reinstall)
    run["install_minutes"] = (time.perf_counter() - t_inst) / 60
    for name, py in pythons.items():
        v = versions(py, ["torch", "e3nn", "ase"] + ([PEERS[name]["pip"][0].split("==")[0]] if name in PEERS else []))
        raw["versions"][name] = ", ".join(f"{k} {x}" for k, x in v.items())

    def kept(code) -> bool:  # rows of earlier runs that this run keeps
        return args.merge and code not in codes

    def worker(code, task, threads, timeout):
        return run_worker(code, pythons[split_code(code)[0]], task, threads, timeout, logfile, run_id)

    logfile = open(out / "workers.log", "a")
    if do_speed:
        raw["speed"] = [r for r in raw["speed"] if kept(r.get("code"))]
        for r in raw["speed"]:
            r.setdefault("measured_utc", f"before {run_id}")
        for key, system, title in MEASURES:
            for code in codes:  # codes interleaved per measure, so a load change hits all alike
                log(f"{title}: {code} ...")
                r = worker(code, tasks[key], args.threads, args.timeout)
                r["measure"] = key
                raw["speed"].append(r)
                if r.get("ok"):
                    t = r["throughput"]
                    log(f"  {t['median']:.3f} {r['unit']} [{t['min']:.3f}-{t['max']:.3f}], peak RSS "
                        f"{r['rss_peak_mb']:.0f} MB (steps {r['rss_step_mb']:.0f} MB), {malloc_of(r)}")
                else:
                    log(f"  FAILED: {r.get('error')}")
        if "mfmlip" in codes:
            raw["extra"] = {}
            for key in ("flops", "profile"):
                log(f"mfmlip {key} ...")
                raw["extra"][key] = worker("mfmlip", tasks[key], args.threads, args.timeout)
        elif not args.merge:
            raw["extra"] = {}
    if do_acc:
        from concurrent.futures import ThreadPoolExecutor

        threads = args.accuracy_threads or args.threads

        def one(code):
            log(f"accuracy: {code} ({tasks['accuracy']['accuracy']['epochs']} epochs, {threads} thread(s)) ...")
            r = worker(code, {**tasks["accuracy"], "threads": threads}, threads, args.timeout * 4)
            log(f"  {code}: force MAE {r.get('force_mae_meV_A', float('nan')):.1f} meV/A" if r.get("ok")
                else f"  {code}: FAILED {r.get('error')}")
            return code, r

        raw["accuracy_zero_force_mae"] = zero_force_mae(Path(tasks["accuracy"]["data"]),
                                                        tasks["accuracy"]["accuracy"]["test"])
        raw["accuracy"] = {c: a for c, a in raw["accuracy"].items() if kept(c)}
        with ThreadPoolExecutor(max_workers=max(1, args.accuracy_parallel)) as pool:
            # CODE@ALLOCATOR and CODE+compile rows are left out: they change the time, not the numbers
            for code, r in pool.map(one, [c for c in codes if not split_code(c)[1] and not compiled(c)]):
                raw["accuracy"][code] = r
    run["load_after"] = loadavg()
    run["other_cores"] = other_cores(cpu0, cpu_snapshot())
    run["under_load"] = run["other_cores"] is not None and run["other_cores"] > 0.2
    run["wall_minutes"] = (time.perf_counter() - t_start) / 60
    raw["machine"] = mach
    used = {r.get("run") for r in [*raw["speed"], *raw["accuracy"].values(), *raw["extra"].values()]}
    raw["runs"] = [r for r in raw["runs"] if r["id"] in used and r["id"] != run_id] + [run]
    raw_path.write_text(json.dumps(raw, indent=1, default=str))
    text = write_report(out, raw)
    print("\n" + text)
    log(f"wrote {out / 'report.md'}, {out / 'speed.csv'}" + (f", {out / 'accuracy.csv'}" if raw["accuracy"] else "")
        + f" in {run['wall_minutes']:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
