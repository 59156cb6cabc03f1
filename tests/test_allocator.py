"""The console script re-executes itself once under tcmalloc when the machine has it, and
otherwise keeps freed memory in glibc's heap."""

import os
import subprocess
import sys

import pytest

from mfmlip.cli import allocator


def test_reexec_preloads_tcmalloc_once(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator.os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    allocator.reexec_with_tcmalloc(["train", "x.yaml"])
    (exe, args, env), = calls
    assert exe == sys.executable
    assert args[1:] == ["-m", "mfmlip.cli.main", "train", "x.yaml"]
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libother.so"
    assert env[allocator.ENV] == "tcmalloc"


@pytest.mark.parametrize("setting", [{"MFMLIP_ALLOCATOR": "system"}, {"LD_PRELOAD": "/x/libtcmalloc.so.4"}])
def test_no_reexec_when_disabled_or_loaded(monkeypatch, setting):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator.os, "execve", lambda *a: pytest.fail("re-executed"))
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    for key, value in setting.items():
        monkeypatch.setenv(key, value)
    allocator.reexec_with_tcmalloc(["train", "x.yaml"])


def test_no_reexec_without_tcmalloc(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(allocator.os, "execve", lambda *a: pytest.fail("re-executed"))
    monkeypatch.delenv(allocator.ENV, raising=False)
    allocator.reexec_with_tcmalloc(["train", "x.yaml"])


def _page_faults_of_freed_and_reallocated_blocks(tune: bool) -> int:
    """Minor page faults of 20 allocations of a 64 MB array in a fresh process
    (mallopt changes the whole process's allocator)."""
    code = (
        "import resource\n"
        f"from mfmlip.cli.allocator import tune_glibc_malloc\nassert {tune} is False or tune_glibc_malloc()\n"
        "import numpy as np\n"
        "np.ones(1 << 23)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20):\n"
        "    np.ones(1 << 23)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout)


def test_glibc_tuning_keeps_freed_blocks_for_reuse():
    untuned, tuned = (_page_faults_of_freed_and_reallocated_blocks(t) for t in (False, True))
    # glibc unmaps the block on free and faults its pages in again on every allocation
    # (a fault per 4 kB page, or per 2 MB with transparent huge pages)
    assert untuned >= 20
    assert tuned < untuned / 10
