"""Building, caching and loading kernels.c; the one switch of every fast path.

The shared library is compiled on first use (about half a second) into ``$PEGASUS_X_CACHE/kernels`` (default
``~/.cache/pegasus-x/kernels``), keyed by the source, the compiler, the CPU, torch and :mod:`.abi`, and loaded from
there afterwards. Beside each ``kernels-KEY.so`` lie:

- ``kernels-KEY.stamp``: its size and sha256, written after it. A library that does not match its stamp (a
  truncated file would crash the process with SIGBUS when loaded) is rebuilt, never loaded.
- ``kernels-KEY.lock``: ``flock``-ed while building, so N processes starting at once (torchrun ranks) compile once.
- ``kernels-KEY.failed``: the reason a build or load failed. Later processes see it and use the torch path without
  trying (or warning) again; delete it to retry.

The folder must belong to the user and be writable by nobody else (the library runs whatever ``.so`` it finds
there); otherwise, like without a C compiler, :func:`library` returns None after one warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from . import abi

SOURCE = Path(__file__).with_name("kernels.c")
SWITCH = "PEGASUS_X_NATIVE"        # "0" (or false/off/no): the torch reference path everywhere
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def enabled(module: nn.Module | None = None) -> bool:
    """The one switch of the fast paths (native kernels, slab linears, fp32 GPU decode attention).

    False when ``PEGASUS_X_NATIVE=0`` or after ``model.set_native(False)`` (which sets ``use_native`` on
    every submodule): the torch reference path then runs everywhere. Also False while ``torch.compile`` traces:
    its graphs cannot call the C kernels, so a compiled model runs the torch path.
    """
    return _switched_on() and getattr(module, "use_native", True) and not torch.compiler.is_compiling()


def _switched_on() -> bool:
    """``PEGASUS_X_NATIVE`` is not 0/false/off/no."""
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def set_enabled(model: nn.Module, on: bool) -> None:
    """Turn the fast paths of ``model`` (every submodule) on or off; see :func:`enabled`."""
    for module in model.modules():
        module.use_native = bool(on)


def available(module: nn.Module | None = None) -> bool:
    """Whether the native kernels may run for ``module``: switched on and built here."""
    return enabled(module) and library() is not None


def cache_dir() -> Path:
    """Where built libraries are kept."""
    root = os.environ.get("PEGASUS_X_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pegasus-x")
    return Path(root) / "kernels"


class _Refused(Exception):
    """A reason to use the torch path, already phrased for the warning."""


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they are switched off or cannot be built here (one warning per process)."""
    if not _switched_on() or platform.system() == "Windows":    # not enabled(): its answer while compiling would stick
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    try:
        return _load(cc)
    except _Refused as err:
        warnings.warn(f"pegasus-x: {err}; decoding uses torch kernels and is slower. Set {SWITCH}=0 to silence "
                      "this.", stacklevel=2)
        return None


def _load(cc: str) -> ctypes.CDLL | None:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise _Refused(f"could not build the native decode kernels with {cc} ({err}); set CC to a working "
                       "compiler") from err
    key = hashlib.sha256(b"\0".join(s.encode() if isinstance(s, str) else s for s in (
        SOURCE.read_bytes(), version, _cpu_id(), torch.__version__, repr(sorted(abi.expected().items())),
        " ".join(FLAGS)))).hexdigest()[:16]
    folder = cache_dir()
    so = folder / f"kernels-{key}.so"
    stamp, failed = so.with_suffix(".stamp"), so.with_suffix(".failed")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        unsafe = _unsafe(folder)
        if unsafe:
            raise _Refused(f"refusing to load native kernels from {folder}: {unsafe}. Run `chmod go-w {folder}` "
                           "if it is yours, or set PEGASUS_X_CACHE to a folder only you can write")
        if failed.exists():             # remembered: the process that failed has warned
            return None
        if not _intact(so, stamp):
            with _locked(so.with_suffix(".lock")):
                if failed.exists():     # another process failed while this one waited
                    return None
                if not _intact(so, stamp):
                    try:
                        _compile(cc, so, stamp)
                    except _Refused as err:
                        raise _remember(failed, str(err)) from err     # inside the lock: no second try
    except OSError as err:
        raise _Refused(f"could not build the native decode kernels with {cc} into {folder} ({err}). Set "
                       "PEGASUS_X_CACHE to a writable folder") from err
    try:
        lib = ctypes.CDLL(str(so))
        abi.check(lib)
    except (OSError, abi.Mismatch) as err:
        raise _remember(failed, f"could not load the native decode kernels {so} ({err})") from err
    return lib


def _remember(failed: Path, reason: str) -> _Refused:
    """Write ``reason`` into the ``failed`` marker; the refusal to warn with."""
    try:
        _write_atomic(failed, reason + "\n")
    except OSError:
        return _Refused(reason)         # nowhere to remember it: every process warns
    return _Refused(f"{reason}. This is remembered in {failed}: delete it to try again")

def _cpu_id() -> str:
    # -march=native code must not run on another CPU (a shared home directory): the CPU's flags join the key.
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _unsafe(folder: Path) -> str | None:
    """Why another user could plant a library in ``folder``, or None."""
    st = folder.stat()
    if st.st_uid != os.getuid():
        return f"it belongs to user id {st.st_uid}, not to you ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"others can write to it (mode {st.st_mode & 0o777:o})"
    return None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(so: Path, stamp: Path) -> bool:
    """Whether ``so`` is the file its stamp describes (size, then sha256): checked before every load."""
    try:
        size, digest = stamp.read_text().split()
        return so.stat().st_size == int(size) and _digest(so) == digest
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (released when the descriptor closes, also if the process dies)."""
    import fcntl                        # POSIX only; library() never gets here on Windows

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(cc: str, so: Path, stamp: Path) -> None:
    """Compile under a temporary name, rename into place, then write the stamp (the caller holds the lock)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=so.parent, prefix=".tmp-")
    os.close(fd)
    try:
        try:
            done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                  timeout=300)
        except (OSError, subprocess.SubprocessError) as err:
            raise _Refused(f"could not build the native decode kernels with {cc} ({err})") from err
        if done.returncode != 0:
            detail = " | ".join(done.stderr.strip()[-2000:].splitlines()) or f"{cc} exited with {done.returncode}"
            raise _Refused(f"could not build the native decode kernels with {cc} ({detail})")
        line = f"{os.path.getsize(tmp)} {_digest(Path(tmp))}\n"
        os.replace(tmp, so)
        _write_atomic(stamp, line)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
