"""Fine-tuning: one explicit training loop, single process or ``torchrun`` (DDP / FSDP), resumable exactly.

This package: :func:`train` (here) and the ``train`` / ``evaluate`` subcommands (:mod:`.commands`). The parts:
:mod:`.options` (what a run is asked to do), :mod:`.trainer` (the loop: what a step is, evaluation, saving),
:mod:`.optim` (optimizer and learning-rate schedule), :mod:`.state` (the checkpoint folders and their trainer state
files), :mod:`.output` (what a run may write into its output folder, the lock on it, the metrics log) and
:mod:`.data` (reading, tokenizing and batching source/target pairs).
"""

from __future__ import annotations

from .options import TrainOptions
from .trainer import Trainer, TrainResult

__all__ = ["TrainOptions", "TrainResult", "Trainer", "train"]


def train(options: TrainOptions) -> TrainResult:
    """Run a training job (see :class:`Trainer`)."""
    return Trainer(options).train()
