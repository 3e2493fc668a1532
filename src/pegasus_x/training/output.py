"""The output folder of a training run: what the run may write there, the lock on it, and its metrics log.

Nothing the user owns is lost. A run replaces or deletes only entries that a run of ours created (listed in the
folder's manifest, :data:`pegasus_x.training.state.MANIFEST`) and writes new names only where nothing exists. A folder
that holds anything else (another tool's files, a foreign ``checkpoint-N``) is refused unless
``overwrite=True`` (``--overwrite-output-dir``), which lets the run write beside those files but still never over
them. The folder of the model being trained is always refused. An exclusive ``fcntl.flock`` on :data:`LOCK` keeps
a second run out while the first one writes; the OS releases it when the process ends, even on a crash.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import IO, Any

from ..checkpoint import GENERATION_CONFIG, SAFE_WEIGHTS, atomic_write_bytes
from ..config import CONFIG_NAME
from ..errors import ConfigError
from ..tokenizer import CONFIG_FILE, SPECIAL_MAP_FILE, SPM_FILE, TOKENIZER_FILE
from .state import CHECKPOINT, MANIFEST, owned_entries, write_manifest

LOCK = ".pegasus-x-train.lock"
METRICS_LOG = "metrics.jsonl"
TENSORBOARD = "tensorboard"
# The final model's files. A tokenizer writes spiece.model or tokenizer.json, which one is known only when it
# saves, so both are reserved.
FINAL_FILES = (CONFIG_NAME, SAFE_WEIGHTS, GENERATION_CONFIG, SPM_FILE, TOKENIZER_FILE, CONFIG_FILE, SPECIAL_MAP_FILE)
STAGING = re.compile(r"^\.(checkpoint-\d+|final)\.tmp$")
# Temporary files of atomic_write_bytes for the files a run writes directly into the folder, left by a killed run.
_LEFTOVER = re.compile(rf"^\.({re.escape(MANIFEST)}|{re.escape(METRICS_LOG)})\..+\.tmp$")


def run_writes(name: str) -> bool:
    """Whether a training run may write an entry called ``name`` into its output folder."""
    return (name in FINAL_FILES or name in (METRICS_LOG, TENSORBOARD, LOCK, MANIFEST)
            or bool(CHECKPOINT.match(name) or STAGING.match(name)))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf, which JSON cannot hold) replaced by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def metrics_line(entry: dict[str, Any]) -> str:
    """One ``metrics.jsonl`` line: strict JSON, non-finite values written as null."""
    return json.dumps(json_safe(entry), allow_nan=False) + "\n"


class OutputFolder:
    """The locked output folder of a run (rank 0 only) and the entries in it that runs of ours created."""

    def __init__(self, path: Path, lock: IO[bytes], owned: set[str]):
        self.path, self.owned, self._lock = path, owned, lock

    def claim(self, name: str) -> Path:
        """``path / name``, recorded in the manifest as ours before anything is written there.

        Raises:
            ConfigError: ``name`` exists and no run of ours created it.
        """
        target = self.path / name
        if name not in self.owned:
            if os.path.lexists(target):
                raise ConfigError(f"{target} was not written by pegasus-x train and is never replaced; move it "
                                  "away or choose another --output-dir")
            self.owned.add(name)
            write_manifest(self.path, self.owned)
        return target

    def remove(self, name: str) -> None:
        """Delete the entry ``name`` if a run of ours created it; anything else stays where it is."""
        if name not in self.owned:
            return
        target = self.path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        elif os.path.lexists(target):
            target.unlink()
        if not os.path.lexists(target):
            self.owned.discard(name)
            write_manifest(self.path, self.owned)

    def open_metrics_log(self, step: int) -> IO[str]:
        """``metrics.jsonl`` opened for appending, keeping only the lines of earlier runs up to ``step``.

        A resumed run repeats the steps after its checkpoint, so their old lines are dropped (as are broken
        lines of a run killed mid-write); a new run (``step`` 0) starts an empty log.
        """
        path = self.claim(METRICS_LOG)
        if path.is_file():
            kept = []
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
                    kept.append(metrics_line(entry))
            atomic_write_bytes(path, "".join(kept).encode("utf-8"))
        return open(path, "a", encoding="utf-8")

    def close(self) -> None:
        """Release the lock (closing its file is what releases a ``flock``)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def open_output_folder(path: str | Path, model: str, overwrite: bool = False) -> OutputFolder:
    """Create (if needed), check and lock the output folder of a run, before any slow work.

    Args:
        path: the output folder.
        model: the model the run starts from (a folder, hub id or preset); its folder is never an output folder.
        overwrite: allow files that runs of ours did not write to stay beside the run's own.
    Raises:
        ConfigError: ``path`` is a file, not writable, the model's folder, locked by another run, or holds files
            we did not write (without ``overwrite``) or would have to replace (with it).
    """
    path = Path(path).expanduser()
    if os.path.lexists(path) and not path.is_dir():
        raise ConfigError(f"--output-dir {path} is a file, not a folder; give a new or empty folder")
    model_dir = Path(model).expanduser()
    if path.is_dir() and model_dir.is_dir() and os.path.samefile(path, model_dir):
        raise ConfigError(f"--output-dir {path} is the folder of the model being trained ({model}); the run "
                          "would overwrite it: choose another --output-dir")
    lock_path = path / LOCK
    try:
        path.mkdir(parents=True, exist_ok=True)
        created_lock = not os.path.lexists(lock_path)
        lock = open(lock_path, "ab")
    except OSError as exc:
        raise ConfigError(f"cannot write to --output-dir {path} ({exc.strerror or exc}); choose a folder you can "
                          "write to") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ConfigError(f"another training run is writing to {path} (it holds {LOCK}); wait for it to end or "
                          "choose another --output-dir") from None
    try:
        owned = owned_entries(path)
        for name in os.listdir(path) if owned else ():      # only where a run of ours wrote before
            if _LEFTOVER.match(name):
                (path / name).unlink(missing_ok=True)
        present = set(os.listdir(path))
        foreign = sorted(present - owned - {MANIFEST, LOCK})
        if foreign and not overwrite:
            listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ConfigError(f"--output-dir {path} holds files pegasus-x train did not write ({listed}); choose a "
                              "new or empty folder, or pass --overwrite-output-dir to write beside them (they are "
                              "never overwritten or deleted)")
        clash = [name for name in foreign if run_writes(name)]
        if clash:
            raise ConfigError(f"--output-dir {path} holds {', '.join(clash)}, not written by pegasus-x train, where "
                              "the run writes its own files; they are never replaced: move them away or choose "
                              "another --output-dir")
        owned = (owned & present) | {LOCK}          # names deleted since the last run are no longer ours
        write_manifest(path, owned)
    except BaseException:
        if created_lock:                            # leave a refused folder as it was
            lock_path.unlink(missing_ok=True)
        lock.close()
        raise
    return OutputFolder(path, lock, owned)
