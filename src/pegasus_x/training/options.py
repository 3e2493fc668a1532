"""What a training run is asked to do: :class:`TrainOptions` and the choices it is validated against.

The ``train`` command (:mod:`pegasus_x.training.commands`) builds one from its flags; :class:`pegasus_x.training.trainer.Trainer` runs it.
:func:`resume_key` is what a resumed run must share with the run it continues.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import PegasusXConfig
from ..errors import ConfigError
from ..generate import DEFAULTS as GENERATION_DEFAULTS
from ..metrics import ROUGE_KEYS

PRESETS = {"tiny": PegasusXConfig.tiny, "base": PegasusXConfig.base, "large": PegasusXConfig.large}
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear", "cosine", "rsqrt")
METRICS = ("loss",) + ROUGE_KEYS + ("bleu", "chrf")
DEFAULT_BATCH_SIZE = 8   # used when neither batch_size nor max_tokens_per_batch is set
# No run finishes more optimizer steps than this (a year at three steps a second): a larger count is a mistake
# that would otherwise only show as a run that never ends.
MAX_STEPS = 100_000_000
MAX_SEED = 2**32 - 1     # NumPy's seed range (torch's is wider)
# generation_config.json keys a model trained here may carry: generate's options, less the per-call ones.
GENERATION_KEYS = tuple(sorted(set(GENERATION_DEFAULTS) - {"generator", "seed", "streamer"}))
_INTS = ("max_source_length", "max_target_length", "max_steps", "batch_size", "max_tokens_per_batch",
         "warmup_steps", "grad_accum", "seed", "eval_every", "eval_samples", "save_every", "keep_best", "log_every")
_FLOATS = ("epochs", "learning_rate", "weight_decay", "clip", "label_smoothing")
# Options a resumed run must share with the run it continues to equal an uninterrupted run (see resume_key).
RESUME_EXACT = ("model", "tokenizer", "train", "source_column", "target_column", "max_source_length",
                "max_target_length", "batch_size", "max_tokens_per_batch", "learning_rate", "optimizer",
                "weight_decay", "schedule", "warmup_steps", "grad_accum", "clip", "label_smoothing", "bf16", "seed",
                "config_overrides")


@dataclass
class TrainOptions:
    """Everything a training run needs; the ``train`` command builds one from its flags.

    ``model`` is a checkpoint folder, a hub id, or a preset (``tiny``/``base``/``large``, random init, shaped
    by ``config_overrides``). Exactly one of ``max_steps``/``epochs`` is required; ``batch_size`` and
    ``max_tokens_per_batch`` are exclusive (neither: ``DEFAULT_BATCH_SIZE``). ``overwrite_output_dir`` lets
    a run write into a folder holding other files (never over them; see :mod:`pegasus_x.training.output`).
    Every number is checked here (finite, in range, a step count that can finish), before any work starts.
    """

    model: str
    train: Any                      # a path or dataset name, or a datasets.Dataset (see pegasus_x.training.data.load_pairs)
    output_dir: str
    tokenizer: str | None = None
    validation: Any = None
    source_column: str = "source"
    target_column: str = "target"
    max_source_length: int = 16384
    max_target_length: int = 256
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    max_tokens_per_batch: int | None = None
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_accum: int = 1
    clip: float = 1.0
    label_smoothing: float = 0.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: int | None = None
    eval_samples: int = 0
    save_every: int | None = None
    keep_best: int = 1
    metric: str = "loss"
    task: str = "summarization"
    resume: bool = False
    overwrite_output_dir: bool = False
    fsdp: bool = False
    device: str | None = None
    save_dtype: str = "fp32"
    log_every: int = 10
    config_overrides: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _INTS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        for name in _FLOATS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError("give exactly one of max_steps (--max-steps) or epochs (--epochs)")
        if self.batch_size is not None and self.max_tokens_per_batch is not None:
            raise ConfigError("batch_size and max_tokens_per_batch exclude each other; give one")
        for name in ("max_steps", "batch_size", "max_tokens_per_batch", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        for name in ("grad_accum", "keep_best", "log_every", "max_source_length", "max_target_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "metric": METRICS,
                   "task": ("summarization", "translation"), "save_dtype": ("fp32", "bf16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is unknown; use one of {', '.join(allowed)}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if self.max_steps is not None:
            check_step_count(self.max_steps, f"max_steps={self.max_steps}")
        if self.epochs is not None:                 # every epoch has at least one batch
            check_step_count(math.ceil(self.epochs / self.grad_accum), f"epochs={self.epochs}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        for name in ("weight_decay", "clip", "warmup_steps", "eval_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.warmup_steps > MAX_STEPS:
            raise ConfigError(f"warmup_steps must be at most {MAX_STEPS:,}, got {self.warmup_steps}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be in [0, {MAX_SEED}] (the range NumPy's generator accepts), "
                              f"got {self.seed}")
        unknown = sorted(set(self.generation_config) - set(GENERATION_KEYS))
        if unknown:
            raise ConfigError(f"--generation-config: unknown key(s) {', '.join(unknown)}; known keys: "
                              f"{', '.join(GENERATION_KEYS)}")
        if self.metric != "loss" and self.eval_samples < 1:
            raise ConfigError(f"metric {self.metric!r} is computed on generated samples: set eval_samples "
                              "(--eval-samples N) or use --metric loss")
        if self.fsdp and (self.optimizer == "adafactor" or self.eval_samples):
            raise ConfigError("with --fsdp use --optimizer adamw (torch's Adafactor cannot update sharded "
                              "parameters) and --eval-samples 0 (generate from a saved checkpoint instead)")
        if self.config_overrides and self.model not in PRESETS:
            raise ConfigError(f"config overrides shape a new model; they need a preset ({', '.join(PRESETS)}), "
                              f"not the checkpoint {self.model!r}")


def check_step_count(steps: int, what: str) -> None:
    """Refuse a run of more than :data:`MAX_STEPS` optimizer steps (``what`` names the option that asked for it).

    Raises:
        ConfigError: ``steps`` > ``MAX_STEPS``.
    """
    if steps > MAX_STEPS:
        raise ConfigError(f"{what} asks for more than {MAX_STEPS:,} optimizer steps, more than any run finishes "
                          "(a year at three steps a second); lower --epochs or --max-steps")


def resume_key(options: TrainOptions) -> dict[str, Any]:
    """The options (as JSON values) a resumed run must share with the run it continues to equal an uninterrupted run.

    Paths are resolved; the training file is identified by its path, size and modification time; the run's length
    counts only for schedules that decay towards it (linear, cosine). Evaluation, checkpoint and logging
    frequencies, the device, the process count and the saved generation config may change.
    """
    key = {name: getattr(options, name) for name in RESUME_EXACT}
    key["model"] = _resolved(options.model)
    key["tokenizer"] = options.tokenizer and _resolved(options.tokenizer)
    key["train"] = _file_identity(options.train)
    if options.batch_size is None and options.max_tokens_per_batch is None:
        key["batch_size"] = DEFAULT_BATCH_SIZE
    if options.schedule in ("linear", "cosine"):
        key["max_steps"], key["epochs"] = options.max_steps, options.epochs
    return json.loads(json.dumps(key))


def changed_options(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``name old -> new`` for every option that differs between two :func:`resume_key` results."""
    def show(value: Any) -> str:
        return "unset" if value is None else value if isinstance(value, str) else json.dumps(value)

    return [f"{name} {show(stored.get(name))} -> {show(current.get(name))}"
            for name in sorted(set(stored) | set(current)) if stored.get(name) != current.get(name)]


def options_record(options: TrainOptions) -> dict[str, Any]:
    """The options as JSON values for a checkpoint's state file (a ``datasets.Dataset`` by its identity)."""
    record = {f.name: getattr(options, f.name) for f in fields(options)}
    for name in ("train", "validation"):
        if record[name] is not None and not isinstance(record[name], (str, os.PathLike)):
            record[name] = _file_identity(record[name])
    return json.loads(json.dumps(record, default=str))


def _resolved(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _file_identity(spec: Any) -> str:
    if not isinstance(spec, (str, os.PathLike)):    # a datasets.Dataset: its content fingerprint
        return f"{type(spec).__name__} {getattr(spec, '_fingerprint', None)} ({len(spec)} rows)"
    path = Path(spec).expanduser()
    if not path.is_file():
        return spec                                 # a dataset name
    stat = path.stat()
    modified = datetime.fromtimestamp(stat.st_mtime).isoformat(timespec="microseconds")
    return f"{path.resolve()} ({stat.st_size} bytes, modified {modified})"
