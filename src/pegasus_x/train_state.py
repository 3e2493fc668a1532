"""A training run's checkpoints on disk: folder names, trainer state files, RNG states, the model files.

A checkpoint is a folder ``checkpoint-{step}`` in the Hugging Face layout plus ``trainer_state.json`` (step, data
position, metrics) and ``trainer_state.pt`` (optimizer and RNG states). :class:`pegasus_x.trainer.Trainer` writes
it into a temporary folder and renames it, so a run killed at any moment leaves the previous one intact; a folder
without both state files is therefore never a checkpoint.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import PegasusXConfig
from .errors import ConfigError
from .model import PegasusXForConditionalGeneration

STATE_JSON, STATE_PT = "trainer_state.json", "trainer_state.pt"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-{step}`` folder with the highest step, or None."""
    folder = Path(output_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*")
             if (m := CHECKPOINT.match(p.name)) and (p / STATE_JSON).is_file() and (p / STATE_PT).is_file()]
    return max(found)[1] if found else None


def rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) RNG states of this process, in a form ``torch.load`` accepts safely."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (the CUDA states only where CUDA is available)."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_model(weights: dict[str, Tensor], config: PegasusXConfig, generation_config: dict[str, Any],
                tokenizer: Any, folder: Path, dtype: torch.dtype) -> None:
    """config.json, model.safetensors, generation_config.json and the tokenizer files into ``folder``.

    Args:
        weights: the full (gathered) model state dict.
        config: the model's config.
        generation_config: written as generation_config.json.
        tokenizer: saved beside the weights.
        folder: created if needed.
        dtype: dtype of the saved weights.
    Raises:
        ConfigError: ``weights`` lack a parameter other than the tied embedding aliases.
    """
    with torch.device("meta"):
        model = PegasusXForConditionalGeneration(config, init=False)
    missing, _ = model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False, assign=True)
    model.tie_weights()
    if set(missing) - {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                       "lm_head.weight"}:
        raise ConfigError(f"internal: gathered weights lack {sorted(missing)[:5]}")
    model.generation_config = dict(generation_config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
