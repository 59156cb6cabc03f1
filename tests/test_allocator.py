"""The console script re-executes itself once under tcmalloc when the machine has it."""

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
