"""The optimizer of a training run and its learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .options import SCHEDULES


def lr_at(step: int, peak: float, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup: ``peak · (step + 1) / warmup_steps`` for ``step < warmup_steps``. After it, with
    ``s = step - warmup_steps`` and ``n = total_steps - warmup_steps``: ``constant`` → peak; ``linear`` →
    ``peak · (1 - s / n)``; ``cosine`` → ``peak · (1 + cos(π s / n)) / 2``; ``rsqrt`` → ``peak ·
    sqrt(max(warmup_steps, 1) / max(step + 1, warmup_steps, 1))`` (1/√step decay after warmup).
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    s, n = step - warmup_steps, max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        return peak
    if schedule == "linear":
        return peak * max(0.0, 1.0 - s / n)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(s, n) / n))
    if schedule == "rsqrt":
        return peak * math.sqrt(max(warmup_steps, 1) / max(step + 1, warmup_steps, 1))
    raise ConfigError(f"schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")


def build_optimizer(model: torch.nn.Module, name: str, learning_rate: float, weight_decay: float
                    ) -> torch.optim.Optimizer:
    """The optimizer ``name`` (``adamw`` or ``adafactor``) over the trainable parameters of ``model``.

    Raises:
        ConfigError: ``adafactor`` on a torch without ``torch.optim.Adafactor`` (before 2.5).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if not hasattr(torch.optim, "Adafactor"):
        raise ConfigError("--optimizer adafactor needs torch >= 2.5 (torch.optim.Adafactor); use adamw")
    # torch's Adafactor is the paper's: factored second moments, no momentum, update clipping, and steps
    # relative to each parameter's RMS — so its learning rate is ~10x AdamW's (e.g. 1e-3).
    return torch.optim.Adafactor(params, lr=learning_rate, weight_decay=weight_decay)
