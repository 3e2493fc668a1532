"""Writing what a user asked for: output files, output folders, JSON text and the standard streams.

Every file the library writes goes through :func:`atomic_open`, which treats an existing path by its kind:

- a regular file is replaced by a temporary file written in the target's own folder, synced and renamed over it,
  so a crash leaves the old content or the new, never half of one; the new file keeps the old one's mode and,
  where permitted, its owner and group;
- a symlink is followed: its target is written by these rules and the link stays a link;
- a regular file with other hard links is rewritten in place once the new content is complete in a temporary
  file (a rename would give this name a new file and leave the other names holding the old content);
- a character device or FIFO (``/dev/null``, ``/dev/stdout``, a named pipe) is opened and streamed to: a rename
  would replace the device (as root, ``/dev/null`` itself) or leave the pipe's reader waiting for nothing;
- anything else (a directory, block device, socket) is refused with :class:`~pegasus_x.errors.InputError`.

:func:`check_output` and :func:`check_output_dir` run the same checks *before* the slow work starts, add a real
write test of the folder, and refuse an output that is one of the run's inputs (the same file by device and
inode, however it is spelled). This module imports nothing heavy, so a command can check its outputs first.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import InputError, PegasusXError

# Errors of the disk rather than of the caller's code; with the fix to name in the message.
_DISK_HINTS = {errno.ENOSPC: "free some space or write to another disk",
               errno.EDQUOT: "free some space within your quota or write to another disk",
               errno.EFBIG: "the file system cannot hold a file this large; write to another disk",
               errno.EROFS: "the file system is read-only; write to another folder",
               errno.EIO: "the disk reported an I/O error; write to another disk"}
_PERMISSION_HINT = "you may not write there; choose a folder you can write to"
# Exit status after the reader of stdout went away: what a shell reports for a command killed by SIGPIPE.
SIGPIPE_STATUS = 141


# ---------------------------------------------------------------------------------------------------- writing
@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open ``path`` for writing by the rules of the module docstring; the content lands on a clean exit.

    An exception inside the block leaves a regular file as it was and removes the temporary file. ``mode`` and
    ``kwargs`` are those of :func:`open` (``"wb"``, or ``"w"`` with an ``encoding``).

    Raises:
        InputError: ``path`` is a directory, block device or socket; or the write failed (a full disk, a
            read-only file system, no permission), with the path named.
    """
    path = Path(path)
    target, st = _target(path, str(path))
    if st is not None and _is_stream(st):
        yield from _stream_to(path, target, mode, kwargs)
        return
    with _errors(path):
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with open(fd, mode, **kwargs) as f:
            with _errors(path, disk_only=True):  # the caller's own errors pass unchanged
                yield f
            with _errors(path):
                f.flush()
                os.fsync(f.fileno())
        with _errors(path):
            if st is not None and st.st_nlink > 1:
                _write_in_place(tmp, target)
                os.unlink(tmp)
            else:
                _take_over(tmp, st)
                os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (see :func:`atomic_open`).

    Raises:
        InputError: as :func:`atomic_open`.
    """
    with atomic_open(path) as f:
        f.write(data)


def json_text(value: Any, what: str, **kwargs: Any) -> str:
    """``json.dumps(value, **kwargs)`` that refuses NaN and infinity, which JSON cannot represent.

    Args:
        value: what to serialise.
        what: names the value in the error, e.g. ``"the metrics"``.
    Raises:
        InputError: ``value`` holds a non-finite float (Python's default would write the invalid ``NaN``).
    """
    try:
        return json.dumps(value, allow_nan=False, **kwargs)
    except ValueError as exc:
        if "JSON compliant" not in str(exc):
            raise
        raise InputError(f"{what} holds a non-finite number (NaN or infinity), which JSON cannot represent; "
                         "nothing was written") from None


def _stream_to(path: Path, target: Path, mode: str, kwargs: dict[str, Any]) -> Iterator[IO]:
    # O_WRONLY without O_CREAT: if the device or pipe vanished meanwhile, fail instead of making a regular file.
    with _errors(path):
        f = open(os.open(target, os.O_WRONLY), mode, **kwargs)
    try:
        with _errors(path, disk_only=True):
            yield f
    except BaseException:
        try:
            f.close()
        except OSError:
            pass  # the error already on its way says what went wrong
        raise
    with _errors(path):
        f.close()  # flushes: a full device (/dev/full) reports it here


def _write_in_place(tmp: str, target: Path) -> None:
    """Copy the complete temporary file into ``target`` itself, keeping its inode and so its other hard links."""
    size = os.path.getsize(tmp)
    with open(tmp, "rb") as src, open(target, "r+b") as dst:
        old = os.fstat(dst.fileno()).st_size
        if size > old:
            # Claim the extra space before overwriting anything: a full disk then leaves the old content intact.
            try:
                os.posix_fallocate(dst.fileno(), old, size - old)
            except OSError:
                dst.truncate(old)
                raise
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        dst.truncate(size)
        dst.flush()
        os.fsync(dst.fileno())


def _take_over(tmp: str, old: os.stat_result | None) -> None:
    """Give the temporary file the mode (and owner) of the file it replaces; a new file gets 0666 & ~umask."""
    if old is None:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file is an ordinary file
        return
    for uid in (old.st_uid, -1):  # only root may give a file away; a group of our own we may always set
        try:
            os.chown(tmp, uid, old.st_gid)
            break
        except PermissionError:
            continue
    os.chmod(tmp, stat.S_IMODE(old.st_mode))  # after chown, which clears set-id bits


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------- checks
def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, flag: str = "--output",
                 make_parents: bool = False) -> None:
    """Refuse, before any slow work, an output file that could not be written or that is one of the inputs.

    Args:
        path: the file the run will write (through :func:`atomic_open`).
        inputs: files (or folders) the run reads; ``"-"`` and missing paths are skipped.
        flag: names the option in messages.
        make_parents: the run creates a missing folder (then its nearest existing ancestor must be writable).
    Raises:
        InputError: ``path`` is a directory or a kind that cannot be written, its folder is missing (unless
            ``make_parents``) or not writable (tested by writing a file there), or it is the same file as an input.
    """
    path = Path(path)
    label = f"{flag} {path}"
    target, st = _target(path, label, hint="name a file")
    _refuse_inputs(path, inputs, label)
    if st is not None and _is_stream(st):
        if not os.access(target, os.W_OK):
            raise InputError(f"cannot write {label}: permission denied; {_PERMISSION_HINT}")
        return
    if not make_parents and not target.parent.is_dir():
        raise InputError(f"{label}: the folder {target.parent} does not exist; create it first")
    _check_folder(target.parent, label)


def check_output_dir(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, flag: str,
                     files: Iterable[str] = ()) -> None:
    """Refuse, before any slow work, an output folder that could not be created or written, or that is an input.

    Args:
        path: the folder the run will create (with its parents) if needed and write ``files`` into.
        inputs: files or folders the run reads; neither the folder nor any of ``files`` may be one of them.
        flag: names the option in messages.
        files: names of the files the run writes there; each is checked like :func:`check_output`.
    Raises:
        InputError: ``path`` is a file, cannot be created, is not writable, or is (or holds as one of ``files``)
            an input.
    """
    path = Path(path)
    label = f"{flag} {path}"
    inputs = list(inputs)
    if path.exists() and not path.is_dir():
        raise InputError(f"{label} is a file, not a folder; name a folder (it is created if missing)")
    _refuse_inputs(path, inputs, label)
    if path.is_dir():
        for name in files:
            check_output(path / name, inputs, flag=flag)
    _check_folder(path, label)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (device and inode, symlinks followed); False when either is missing."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _refuse_inputs(path: Path, inputs: Iterable[str | os.PathLike], label: str) -> None:
    for item in inputs:
        if str(item) != "-" and same_file(path, item):
            shown = "" if str(item) == str(path) else f" ({item})"
            raise InputError(f"{label} is one of the inputs{shown}; writing it would destroy that input; choose "
                             "another output path")


def _check_folder(folder: Path, label: str) -> None:
    """``folder``, or the nearest existing ancestor the run would create it in, must take a new file.

    The test is a real one — create, write one byte, delete — because permission bits say little (root, ACLs, a
    read-only mount) and a full disk shows only when a write needs space.
    """
    existing = folder.absolute()
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot create the folder of {label}: {existing} is not a folder")
    with _errors(existing, label=label):
        fd, tmp = tempfile.mkstemp(dir=existing, prefix=".pegasus-x-check.", suffix=".tmp")
        try:
            os.write(fd, b"\n")
        finally:
            os.close(fd)
            os.unlink(tmp)


def _target(path: Path, label: str, hint: str = "write to a file") -> tuple[Path, os.stat_result | None]:
    """The file a write to ``path`` lands in (symlinks followed) and its stat; None when it does not exist yet.

    Raises:
        InputError: the target is a kind no write may go to.
    """
    target = Path(os.path.realpath(path))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target, None
    except OSError as exc:
        raise _write_error(label, exc) from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{label} is a directory; {hint} inside it or elsewhere")
    if not (stat.S_ISREG(st.st_mode) or _is_stream(st)):
        kind = "block device" if stat.S_ISBLK(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else \
            "special file"
        raise InputError(f"{label} is a {kind}; write to a regular file, a named pipe or a character device "
                         "such as /dev/null")
    return target, st


def _is_stream(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)


@contextmanager
def _errors(path: Path, *, disk_only: bool = False, label: str | None = None) -> Iterator[None]:
    """OSErrors of a write as an :class:`InputError` naming ``path``; with ``disk_only``, only the disk's own."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, PegasusXError) or (disk_only and exc.errno not in _DISK_HINTS):
            raise
        raise _write_error(label or str(path), exc) from None


def _write_error(label: str, exc: OSError) -> InputError:
    if exc.errno in _DISK_HINTS:
        hint = _DISK_HINTS[exc.errno]
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = _PERMISSION_HINT
    else:
        hint = "check the path"
    return InputError(f"cannot write {label}: {exc.strerror or exc}; {hint}")


# ---------------------------------------------------------------------------------------------------- stdio
class _Closed:
    """Stands in for a standard stream closed before the program started (``>&-``, ``<&-``).

    Python then sets the stream to None, and ``print`` to None silently drops the text: a summary would be lost
    with exit status 0. Here reading or writing raises an error the command line reports.
    """

    def __init__(self, what: str, fix: str) -> None:
        self._what, self._fix = what, fix

    @property
    def buffer(self) -> _Closed:
        return self

    def _refuse(self, *args: Any) -> Any:
        raise InputError(f"cannot {self._what}: it is closed; {self._fix}")

    write = read = readline = _refuse

    def fileno(self) -> int:
        raise io.UnsupportedOperation(f"cannot {self._what}: it is closed")

    def flush(self) -> None:
        pass  # nothing was ever written

    def isatty(self) -> bool:
        return False


class _Stdout:
    """``sys.stdout`` during a command: a failed write becomes a one-line error, a closed reader a quiet exit.

    On the first failure the real stream is pointed at ``/dev/null``, so the interpreter's last flush at exit
    neither prints "Exception ignored" nor changes the exit status.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False  # the reader went away (EPIPE): the user stopped reading, not an error

    def write(self, text: str) -> int:
        with self._failures():
            return self._stream.write(text)

    def flush(self) -> None:
        with self._failures():
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    @contextmanager
    def _failures(self) -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:
            self.broken = True
            self._discard()
            raise
        except OSError as exc:
            self._discard()
            raise InputError(f"cannot write to stdout: {exc.strerror or exc}") from None

    def _discard(self) -> None:
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError, AttributeError):
            return  # not a real file (a test's capture): nothing will flush at exit
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)


@contextmanager
def guarded_stdio() -> Iterator[_Stdout | None]:
    """For the length of one command: closed standard streams stand-ins, and stdout wrapped by :class:`_Stdout`.

    Yields the wrapper (None when stdout was closed). File descriptors 0–2 closed at startup are taken by
    ``/dev/null``: otherwise the first file the command opens (an output's temporary file) would get one of
    those numbers, and anything writing to "stdout" at the descriptor level would land in it.
    """
    saved = sys.stdin, sys.stdout, sys.stderr
    for fd, flags in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, flags)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdin is None:
        sys.stdin = _Closed("read stdin", "pipe text in, or pass files or --input")  # type: ignore[assignment]
    sink = None
    if sys.stderr is None:
        # print(file=None) writes to stdout: messages would mix into the output; the user chose to drop them.
        sys.stderr = sink = open(os.devnull, "w")
    wrapper = None
    if sys.stdout is None:
        sys.stdout = _Closed("write to stdout", "redirect it to a file, or use --output")  # type: ignore[assignment]
    else:
        sys.stdout = wrapper = _Stdout(sys.stdout)  # type: ignore[assignment]
    try:
        yield wrapper
    finally:
        if sink is not None:
            sink.close()
        sys.stdin, sys.stdout, sys.stderr = saved


def check_stdout() -> None:
    """Refuse, before any slow work, to produce output for a stdout that was closed at startup.

    Raises:
        InputError: stdout is closed (inside :func:`guarded_stdio`).
    """
    if isinstance(sys.stdout, _Closed):
        sys.stdout.write("")
