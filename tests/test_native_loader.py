"""Building, caching and loading the native kernels (pegasus_x.native.loader, .abi): built once per cache key even by
processes starting together, never loaded when damaged or from a folder others can write, a failed build remembered,
and the C and Python sides of the interface checked against each other at load."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from conftest import HAVE_CC
from pegasus_x.native import abi, loader

needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine: install cc or gcc to run it")
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """library() forgets its cached result, builds into an empty cache folder, and is reset afterwards."""
    loader.library.cache_clear()
    monkeypatch.setenv("PEGASUS_X_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache" / "kernels"
    loader.library.cache_clear()


def counting_cc(tmp_path: Path, exit_code: int | None = None) -> tuple[Path, Path]:
    """A compiler wrapper that appends a line to a log for each compilation (not ``--version``), then runs the real
    compiler, or fails with ``exit_code``."""
    log, cc = tmp_path / "compilations", tmp_path / "cc"
    real = next(shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c))
    then = f"echo 'cc: error: no such thing' >&2; exit {exit_code}" if exit_code is not None else "sleep 1"
    cc.write_text(f'#!/bin/sh\ncase "$*" in *-shared*) echo x >> {log}; {then};; esac\nexec {real} "$@"\n')
    cc.chmod(0o755)
    return cc, log


def compilations(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


# ------------------------------------------------------------------------------------------------ build and cache
@needs_cc
def test_builds_into_the_cache_folder_once(fresh_build):
    assert loader.library() is not None
    built = sorted(fresh_build.iterdir())
    assert [p.suffix for p in built] == [".lock", ".so", ".stamp"]     # no temporary file left behind
    assert fresh_build.stat().st_mode & 0o777 == 0o700
    so = built[1]
    assert built[2].read_text().split()[0] == str(so.stat().st_size)
    stamp = so.stat().st_mtime_ns
    loader.library.cache_clear()
    assert loader.library() is not None
    assert so.stat().st_mtime_ns == stamp                               # the second process reuses the build


def test_source_compiles_without_warnings(tmp_path):
    if not HAVE_CC:
        pytest.skip("no C compiler on this machine: install cc or gcc to run it")
    cc = next(shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c))
    done = subprocess.run([cc, *loader.FLAGS, "-Wall", "-Wextra", "-Werror", "-o", str(tmp_path / "k.so"),
                           str(loader.SOURCE), "-lm"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_switched_off_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("PEGASUS_X_NATIVE", "0")
    assert loader.library() is None and not loader.enabled()
    assert not fresh_build.exists()


def test_failed_build_warns_once_and_is_remembered(fresh_build, monkeypatch, tmp_path):
    cc, log = counting_cc(tmp_path, exit_code=1)
    monkeypatch.setenv("CC", str(cc))
    with pytest.warns(UserWarning, match="could not build the native decode kernels.*no such thing.*remembered in "
                                         ".*failed: delete it to try again.*PEGASUS_X_NATIVE=0"):
        assert loader.library() is None
    assert compilations(log) == 1
    [failed] = fresh_build.glob("*.failed")
    assert "no such thing" in failed.read_text()
    assert not list(fresh_build.glob("*.so")) and not list(fresh_build.glob(".tmp-*"))   # nothing half-written
    loader.library.cache_clear()                                        # the next process
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # ... does not warn again
        assert loader.library() is None
    assert compilations(log) == 1                                       # ... nor try again
    failed.unlink()                                                     # the documented way to retry
    loader.library.cache_clear()
    with pytest.warns(UserWarning, match="no such thing"):
        assert loader.library() is None
    assert compilations(log) == 2


@needs_cc
def test_unwritable_cache_warns_and_falls_back(fresh_build, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PEGASUS_X_CACHE", str(blocker / "cache"))     # a folder under a file cannot be made
    with pytest.warns(UserWarning, match="PEGASUS_X_CACHE to a writable folder"):
        assert loader.library() is None


@needs_cc
@pytest.mark.parametrize("problem", ["others can write", "another owner"])
def test_refuses_a_cache_folder_others_control(fresh_build, monkeypatch, tmp_path, problem):
    cc, log = counting_cc(tmp_path)
    monkeypatch.setenv("CC", str(cc))
    fresh_build.mkdir(parents=True)
    if problem == "others can write":
        fresh_build.chmod(0o777)
        match = "others can write to it \\(mode 777\\)"
    else:
        if os.getuid() != 0:
            pytest.skip("giving a folder to another user needs root: run as root")
        os.chown(fresh_build, os.getuid() + 4242, -1)
        match = f"belongs to user id {os.getuid() + 4242}"
    with pytest.warns(UserWarning, match=f"refusing to load native kernels from .*{match}.*chmod go-w"):
        assert loader.library() is None
    assert compilations(log) == 0 and not list(fresh_build.iterdir())  # nothing built, loaded or remembered there


@needs_cc
def test_damaged_library_is_not_intact(tmp_path):
    so, stamp = tmp_path / "k.so", tmp_path / "k.stamp"
    cc = next(shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c))
    loader._compile(cc, so, stamp)                                      # built, not loaded: safe to damage
    assert loader._intact(so, stamp)
    data = so.read_bytes()
    so.write_bytes(data[: len(data) // 2])                              # truncated (SIGBUS if loaded)
    assert not loader._intact(so, stamp)
    so.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))                   # same size, one bit changed
    assert not loader._intact(so, stamp)
    so.write_bytes(data)
    assert loader._intact(so, stamp)
    stamp.unlink()                                                      # a build that died before its stamp
    assert not loader._intact(so, stamp)


def _python(code: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env,
                            "PYTHONPATH": SRC}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


LINEAR_CHECK = """
    import torch
    from pegasus_x.native import kernels, loader
    torch.manual_seed(0)
    w, x = torch.randn(300, 64), torch.randn(2, 64)
    assert loader.library() is not None
    torch.testing.assert_close(kernels.linear(x, w, None), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    print("ok")
"""


@needs_cc
@pytest.mark.slow
def test_truncated_cached_library_is_rebuilt_in_a_new_process(tmp_path):
    env = {"PEGASUS_X_CACHE": str(tmp_path / "cache")}
    first = _python(LINEAR_CHECK, env)
    assert first.communicate(timeout=300)[0].strip() == "ok"
    [so] = (tmp_path / "cache" / "kernels").glob("*.so")                # this process never loaded it
    size = so.stat().st_size
    with open(so, "r+b") as f:
        f.truncate(size // 3)
    second = _python(LINEAR_CHECK, env)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0 and out.strip() == "ok", (second.returncode, err[-2000:])   # -7: SIGBUS
    assert so.stat().st_size == size                                   # rebuilt whole


@needs_cc
@pytest.mark.slow
def test_processes_starting_together_compile_once(tmp_path):
    cc, log = counting_cc(tmp_path)                                     # each compilation takes 1 s longer
    env = {"PEGASUS_X_CACHE": str(tmp_path / "cache"), "CC": str(cc), "OMP_NUM_THREADS": "1"}
    started = [_python(LINEAR_CHECK, env) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in started]
    assert [out.strip() for out, _ in results] == ["ok"] * 3, [err[-2000:] for _, err in results]
    assert compilations(log) == 1


# ---------------------------------------------------------------------------------------------------------- ABI
@needs_cc
def test_abi_facts_agree_and_a_drift_is_named(monkeypatch):
    lib = loader.library()
    assert lib is not None
    abi.check(lib)                                                      # what every load does
    monkeypatch.setattr(abi, "MAX_ROWS", 9)
    with pytest.raises(abi.Mismatch, match="max_rows: C 8, Python 9"):
        abi.check(lib)
    monkeypatch.undo()
    monkeypatch.setitem(abi.ENUM, "tanh", 7)
    with pytest.raises(abi.Mismatch, match="act.tanh: C 4, Python 7"):
        abi.check(lib)
    monkeypatch.undo()

    class Wider(ctypes.Structure):                                     # eps as a double: size and layout differ
        _fields_ = [*abi.Layer._fields_[:-1], ("eps", ctypes.c_double)]

    monkeypatch.setattr(abi, "Layer", Wider)
    with pytest.raises(abi.Mismatch, match="px_layer.eps.size: C 4, Python 8"):
        abi.check(lib)


@needs_cc
@pytest.mark.slow
def test_abi_drift_refuses_the_library(fresh_build, monkeypatch):
    built = abi.VERSION
    monkeypatch.setattr(abi, "VERSION", 99)
    with pytest.warns(UserWarning, match=f"could not load the native decode kernels.*abi: C {built}, Python 99"):
        assert loader.library() is None
    assert list(fresh_build.glob("*.failed"))                          # keyed by the Python side too:
    monkeypatch.undo()                                                  # the fixed one builds afresh
    monkeypatch.setenv("PEGASUS_X_CACHE", str(fresh_build.parent))
    loader.library.cache_clear()
    assert loader.library() is not None


def test_describe_names_the_kernels_that_run(monkeypatch):
    """``pegasus-x info``'s line: switched off, not built, built without or with the encoder's tiles."""
    from pegasus_x.native import kernels

    monkeypatch.setenv(loader.SWITCH, "0")
    assert "switched off" in kernels.describe()
    monkeypatch.setenv(loader.SWITCH, "1")
    monkeypatch.setattr(loader, "library", lambda: None)
    assert "not built" in kernels.describe()

    class Lib:
        def __init__(self, preferred: int):
            self.px_gemm_preferred = lambda: preferred

    monkeypatch.setattr(loader, "library", lambda: Lib(0))
    assert kernels.describe().startswith("native: decode steps") and "torch's GEMM" in kernels.describe()
    monkeypatch.setattr(loader, "library", lambda: Lib(1))
    assert kernels.describe() == "native: decode steps, the encoder's fp32 GEMM and attention"
