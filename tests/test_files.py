"""Output safety (pegasus_x.files): every kind of path a write may meet, checks before work, stdin/stdout failures.

The tests run as root, so "not writable" cannot come from permission bits: it comes from /sys (where the
container refuses new files) or from a patched ``mkstemp``. Devices are made with ``mknod`` inside the test's own
folder; no test writes to a real /dev node through the code under test.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pegasus_x import files
from pegasus_x.cli import main
from pegasus_x.errors import CheckpointError, InputError
from pegasus_x.files import atomic_open, atomic_write_bytes, check_output, check_output_dir, json_text, same_file
from conftest import assert_imports_without_torch

DEMO = Path(files.__file__).parent / "assets" / "demo"
TEXT = "The cat command reads each file in sequence and writes it to the standard output. It can join files.\n"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def mknod(path: Path, kind: int, major: int, minor: int) -> Path:
    try:
        os.mknod(path, 0o666 | kind, os.makedev(major, minor))
    except PermissionError:
        pytest.skip("mknod is not permitted here: run as root (or with CAP_MKNOD)")
    return path


def read_fifo(path: Path) -> tuple[threading.Thread, dict]:
    """A reader of the FIFO ``path`` in a daemon thread (a writer that never comes must not hang the test)."""
    got: dict = {}

    def run() -> None:
        with open(path, "rb") as f:
            got["data"] = f.read()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


def refuse_mkstemp(monkeypatch, code: int = errno.EACCES) -> None:
    def mkstemp(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)


# ---------------------------------------------------------------------------------------------------- atomic_open
def test_new_file_gets_umask_mode_and_regular_file_keeps_mode_and_owner(tmp_path):
    new = tmp_path / "new.jsonl"
    atomic_write_bytes(new, b"a\n")
    mask = os.umask(0)
    os.umask(mask)
    assert new.read_bytes() == b"a\n" and stat.S_IMODE(new.stat().st_mode) == 0o666 & ~mask
    old = tmp_path / "old.jsonl"
    old.write_text("old\n")
    os.chmod(old, 0o640)
    if os.geteuid() == 0:
        os.chown(old, 1234, 4321)
    atomic_write_bytes(old, b"new\n")
    assert old.read_bytes() == b"new\n" and stat.S_IMODE(old.stat().st_mode) == 0o640
    if os.geteuid() == 0:
        assert (old.stat().st_uid, old.stat().st_gid) == (1234, 4321)
    assert leftovers(tmp_path) == []


def test_symlink_writes_its_target_and_stays_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "out.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with atomic_open(link, "w", encoding="utf-8") as f:
        f.write("ünïcode\n")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text(encoding="utf-8") == "ünïcode\n"
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "real" / "later.jsonl")
    atomic_write_bytes(dangling, b"x")           # like `echo x > dangling`: the target is created
    assert dangling.is_symlink() and (tmp_path / "real" / "later.jsonl").read_bytes() == b"x"
    assert leftovers(tmp_path / "real") == [] and leftovers(tmp_path) == []


def test_hard_link_is_kept_and_sees_the_new_content(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b"a much longer old content than the new one\n")
    os.link(a, b)
    inode = a.stat().st_ino
    atomic_write_bytes(a, b"short\n")
    assert a.stat().st_ino == inode and b.read_bytes() == b"short\n" and a.stat().st_nlink == 2
    atomic_write_bytes(b, b"grown " * 1000)
    assert a.read_bytes() == b"grown " * 1000
    with pytest.raises(RuntimeError), atomic_open(a) as f:   # a failure before the copy changes nothing
        f.write(b"half")
        raise RuntimeError("boom")
    assert b.read_bytes() == b"grown " * 1000 and leftovers(tmp_path) == []


def test_fifo_is_streamed_to_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    thread, got = read_fifo(fifo)
    atomic_write_bytes(fifo, b"line 1\nline 2\n")
    thread.join(timeout=10)
    assert got.get("data") == b"line 1\nline 2\n"
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and leftovers(tmp_path) == []


def test_character_device_stays_a_device(tmp_path):
    null = mknod(tmp_path / "null", stat.S_IFCHR, 1, 3)
    atomic_write_bytes(null, b"discarded\n")
    check_output(null)
    assert stat.S_ISCHR(null.lstat().st_mode) and null.lstat().st_rdev == os.makedev(1, 3)
    assert leftovers(tmp_path) == []


def test_full_device_is_a_clear_error(tmp_path):
    full = mknod(tmp_path / "full", stat.S_IFCHR, 1, 7)
    with pytest.raises(InputError, match=r"cannot write .*full: No space left on device; free some space"):
        atomic_write_bytes(full, b"x" * 100_000)
    assert stat.S_ISCHR(full.lstat().st_mode)


def test_directory_socket_and_block_device_are_refused(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        atomic_write_bytes(tmp_path, b"x")
    with tempfile.TemporaryDirectory(prefix="px") as short:   # a socket path must be short
        sock_path = Path(short) / "s"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(sock_path))
            for call in (lambda: atomic_write_bytes(sock_path, b"x"), lambda: check_output(sock_path)):
                with pytest.raises(InputError, match="is a socket"):
                    call()
            assert stat.S_ISSOCK(sock_path.lstat().st_mode)
    block = mknod(tmp_path / "blk", stat.S_IFBLK, 7, 0)
    with pytest.raises(InputError, match="is a block device"):
        check_output(block)
    with pytest.raises(InputError, match="is a block device"):
        atomic_write_bytes(block, b"x")


def test_failures_leave_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    with pytest.raises(ValueError, match="caller"), atomic_open(out) as f:
        f.write(b"partial")
        raise ValueError("caller's own error passes unchanged")
    assert out.read_text() == "old\n" and leftovers(tmp_path) == []

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(InputError, match=rf"cannot write {out}: No space left on device; free some space"):
        atomic_write_bytes(out, b"new\n")
    assert out.read_text() == "old\n" and leftovers(tmp_path) == []


def test_read_only_file_system_and_missing_permission_name_the_path(tmp_path, monkeypatch):
    refuse_mkstemp(monkeypatch, errno.EROFS)
    with pytest.raises(InputError, match=r"cannot write .*x.json: Read-only file system; .*another folder"):
        atomic_write_bytes(tmp_path / "x.json", b"{}")
    refuse_mkstemp(monkeypatch, errno.EACCES)
    with pytest.raises(InputError, match=r"--output .*x.json: Permission denied; you may not write there"):
        check_output(tmp_path / "x.json")


# ---------------------------------------------------------------------------------------------------- checks
def test_same_file_by_inode_through_symlinks_and_hard_links(tmp_path):
    source = tmp_path / "doc.txt"
    source.write_text(TEXT)
    link, hard, other = tmp_path / "link.txt", tmp_path / "hard.txt", tmp_path / "other.txt"
    link.symlink_to(source)
    os.link(source, hard)
    other.write_text(TEXT)
    for spelling in (source, link, hard, tmp_path / "." / "doc.txt"):
        with pytest.raises(InputError, match="is one of the inputs"):
            check_output(spelling, [source])
        with pytest.raises(InputError, match="is one of the inputs"):
            check_output(source, ["-", spelling])
    check_output(other, [source, "-", tmp_path / "missing.txt"])
    assert same_file(link, hard) and not same_file(source, other) and not same_file(source, tmp_path / "nope")
    assert source.read_text() == TEXT


def test_check_output_needs_an_existing_writable_folder(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="does not exist; create it first"):
        check_output(tmp_path / "missing" / "out.jsonl")
    check_output(tmp_path / "missing" / "deeper" / "out.jsonl", make_parents=True)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(InputError, match="is a directory"):
        check_output(tmp_path)
    assert leftovers(tmp_path) == []


def test_a_folder_the_system_refuses_is_caught_by_a_real_write():
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        pass
    else:
        os.close(fd)
        os.unlink(probe)
        pytest.skip("/sys accepts new files here: run where /sys refuses them (a container, or sysfs)")
    with pytest.raises(InputError, match="cannot write --output /sys/out.jsonl"):
        check_output("/sys/out.jsonl")


def test_check_output_dir(tmp_path):
    data = tmp_path / "run" / "predictions.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    with pytest.raises(InputError, match="is one of the inputs"):
        check_output_dir(tmp_path / "run", [data], flag="--output-dir", files=["predictions.jsonl"])
    with pytest.raises(InputError, match="is one of the inputs"):
        check_output_dir(tmp_path / "run", [tmp_path / "run"], flag="--output-dir")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_output_dir(data, flag="--output-dir")
    with pytest.raises(InputError, match="is not a folder"):
        check_output_dir(data / "sub", flag="--output-dir")
    (tmp_path / "run" / "metrics.json").mkdir()
    with pytest.raises(InputError, match="metrics.json is a directory"):
        check_output_dir(tmp_path / "run", flag="--output-dir", files=["metrics.json"])
    check_output_dir(tmp_path / "new" / "deeper", [data], flag="--output-dir", files=["metrics.json"])
    assert not (tmp_path / "new").exists() and data.read_text() == "{}\n"


def test_json_text_refuses_non_finite_numbers():
    assert json.loads(json_text({"a": [1.5, "x"]}, "it")) == {"a": [1.5, "x"]}
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(InputError, match="the metrics holds a non-finite number"):
            json_text({"rouge1": bad}, "the metrics")


KINDS = ["missing", "regular", "symlink", "hard_link", "fifo", "input_by_symlink", "input_by_hard_link",
         "read_only_folder"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), data=st.binary(max_size=300), mode=st.sampled_from([0o600, 0o640, 0o644]))
def test_property_a_write_is_refused_first_or_lands_where_the_path_points(monkeypatch, kind, data, mode):
    """Whatever the path is, either the check refuses it before anything changes, or the content lands in the
    file the path points to, the path keeps its kind, the input is untouched and no temporary file is left."""
    with tempfile.TemporaryDirectory() as tmp, monkeypatch.context() as patch:
        root = Path(tmp)
        source = root / "input.txt"
        source.write_bytes(b"the input\n")
        out, target = root / "out.jsonl", root / "target.jsonl"
        if kind in ("regular", "hard_link", "symlink"):
            target.write_bytes(b"old\n")
            os.chmod(target, mode)
        if kind == "regular":
            out = target
        elif kind == "symlink":
            out.symlink_to(target)
        elif kind == "hard_link":
            os.link(target, out)
        elif kind == "fifo":
            os.mkfifo(out)
        elif kind == "input_by_symlink":
            out.symlink_to(source)
        elif kind == "input_by_hard_link":
            os.link(source, out)
        elif kind == "read_only_folder":
            refuse_mkstemp(patch, errno.EROFS)
        before = out.lstat().st_mode if os.path.lexists(out) else None
        try:
            check_output(out, [source])
        except InputError:
            assert kind in ("input_by_symlink", "input_by_hard_link", "read_only_folder")
            assert source.read_bytes() == b"the input\n"
            return
        assert kind not in ("input_by_symlink", "input_by_hard_link", "read_only_folder")
        reader = read_fifo(out) if kind == "fifo" else None
        atomic_write_bytes(out, data)
        if reader is not None:
            reader[0].join(timeout=10)
            assert reader[1].get("data") == data
        else:
            assert out.read_bytes() == data
        if before is not None:
            assert stat.S_IFMT(out.lstat().st_mode) == stat.S_IFMT(before)
        if kind in ("regular", "symlink", "hard_link"):
            assert stat.S_IMODE(target.stat().st_mode) == mode
        assert source.read_bytes() == b"the input\n" and leftovers(root) == []


# ---------------------------------------------------------------------------------------------------- commands
def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(Path(files.__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "pegasus_x", *args], timeout=120, env=env, **kwargs)


def closing(fd: int):
    return lambda: os.close(fd)


def test_summarize_output_naming_an_input_is_refused_and_the_input_kept(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    (tmp_path / "alias.txt").symlink_to(doc)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(json.dumps({"text": TEXT}) + "\n")
    for argv in (["summarize", str(doc), "--output", str(tmp_path / "alias.txt")],
                 ["summarize", "--input", str(corpus), "--output", str(corpus)]):
        assert main(argv) == 2
        assert "is one of the inputs" in capsys.readouterr().err
    assert doc.read_text() == TEXT and corpus.read_text() == json.dumps({"text": TEXT}) + "\n"


def test_unwritable_output_folder_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    summarize_module = sys.modules["pegasus_x.summarize"]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    monkeypatch.setattr(summarize_module, "Summarizer", no_model)
    refuse_mkstemp(monkeypatch)
    assert main(["summarize", str(doc), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert "Permission denied" in capsys.readouterr().err


def test_pretrain_pairs_out_equal_to_data_is_refused(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    text = json.dumps({"text": "Sun rises. Sun sets. Moon rises."}) + "\n"
    data.write_text(text)
    assert main(["pretrain", "--data", str(data), "--pairs-out", str(data), "--", "--max-steps", "1"]) == 2
    assert "--pairs-out" in capsys.readouterr().err and data.read_text() == text


def test_evaluate_output_dir_holding_the_data_is_refused_before_the_model_loads(tmp_path, capsys):
    data = tmp_path / "predictions.jsonl"
    data.write_text(json.dumps({"source": "a", "target": "b"}) + "\n")
    assert main(["evaluate", "--model", str(tmp_path / "no-model"), "--data", str(data),
                 "--output-dir", str(tmp_path)]) == 2
    assert "is one of the inputs" in capsys.readouterr().err and data.read_text().startswith('{"source"')


def test_convert_refuses_its_source_folder_and_existing_checkpoint_files(tmp_path):
    from pegasus_x.convert import convert_pegasus

    source = tmp_path / "pegasus"
    source.mkdir()
    with pytest.raises(CheckpointError, match="is the folder of the source checkpoint"):
        convert_pegasus(source, tmp_path / "." / "pegasus")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone's weights")
    with pytest.raises(CheckpointError, match=r"already holds a checkpoint \(model.safetensors\)"):
        convert_pegasus(source, out)
    assert (out / "model.safetensors").read_bytes() == b"someone's weights"


@pytest.mark.slow
def test_closed_stdout_is_an_error_before_any_work(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    proc = run_cli("summarize", str(doc), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=closing(1))
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == ("pegasus-x: error: cannot write to stdout: it is closed; redirect it "
                                            "to a file, or use --output")


@pytest.mark.slow
def test_closed_stdin_is_an_error(tmp_path):
    proc = run_cli("summarize", "-", stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=closing(0))
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode().strip() == ("pegasus-x: error: cannot read stdin: it is closed; pipe text in, or "
                                            "pass files or --input")


@pytest.mark.slow
def test_stdout_on_a_full_disk():
    with open("/dev/full", "wb") as full:   # only a file descriptor of it: the code under test cannot replace it
        proc = run_cli("info", str(DEMO), stdout=full, stderr=subprocess.PIPE)
    assert proc.returncode == 2
    assert proc.stderr.decode() == "pegasus-x: error: cannot write to stdout: No space left on device\n"


@pytest.mark.slow
def test_stdout_into_a_closed_pipe():
    read, write = os.pipe()
    os.close(read)                         # `| head` that has already exited
    try:
        proc = run_cli("info", str(DEMO), stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert proc.returncode == files.SIGPIPE_STATUS and proc.stderr == b""   # no traceback, no "Exception ignored"


def test_stream_into_a_closed_pipe_stops_quietly(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    read, write = os.pipe()
    os.close(read)
    stream = open(write, "w")
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        assert main(["summarize", str(doc), "--stream", "--max-new-tokens", "8"]) == files.SIGPIPE_STATUS
    finally:
        stream.close()                    # the pipe's descriptor now points at /dev/null: closing succeeds
    assert sys.stdout is stream and "Traceback" not in capsys.readouterr().err


def test_summary_to_a_full_stdout_in_process(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        assert main(["summarize", str(doc), "--max-new-tokens", "2"]) == 2
    assert "cannot write to stdout: No space left on device" in capsys.readouterr().err


def test_files_imports_without_torch():
    assert_imports_without_torch("pegasus_x.files")
