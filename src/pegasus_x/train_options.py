"""What a training run is asked to do: :class:`TrainOptions` and the choices it is validated against.

The ``train`` command (:mod:`pegasus_x.train`) builds one from its flags; :class:`pegasus_x.trainer.Trainer` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import PegasusXConfig
from .errors import ConfigError
from .metrics import ROUGE_KEYS

PRESETS = {"tiny": PegasusXConfig.tiny, "base": PegasusXConfig.base, "large": PegasusXConfig.large}
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear", "cosine", "rsqrt")
METRICS = ("loss",) + ROUGE_KEYS + ("bleu", "chrf")
DEFAULT_BATCH_SIZE = 8   # used when neither batch_size nor max_tokens_per_batch is set


@dataclass
class TrainOptions:
    """Everything a training run needs; the ``train`` command builds one from its flags.

    ``model`` is a checkpoint folder, a hub id, or a preset (``tiny``/``base``/``large``, random init, shaped
    by ``config_overrides``). Exactly one of ``max_steps``/``epochs`` is required; ``batch_size`` and
    ``max_tokens_per_batch`` are exclusive (neither: ``DEFAULT_BATCH_SIZE``).
    """

    model: str
    train: str
    output_dir: str
    tokenizer: str | None = None
    validation: str | None = None
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
    fsdp: bool = False
    device: str | None = None
    save_dtype: str = "fp32"
    log_every: int = 10
    config_overrides: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
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
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.clip < 0:
            raise ConfigError("learning_rate must be positive, warmup_steps and clip non-negative")
        if self.metric != "loss" and self.eval_samples < 1:
            raise ConfigError(f"metric {self.metric!r} is computed on generated samples: set eval_samples "
                              "(--eval-samples N) or use --metric loss")
        if self.fsdp and (self.optimizer == "adafactor" or self.eval_samples):
            raise ConfigError("with --fsdp use --optimizer adamw (torch's Adafactor cannot update sharded "
                              "parameters) and --eval-samples 0 (generate from a saved checkpoint instead)")
        if self.config_overrides and self.model not in PRESETS:
            raise ConfigError(f"config overrides shape a new model; they need a preset ({', '.join(PRESETS)}), "
                              f"not the checkpoint {self.model!r}")
