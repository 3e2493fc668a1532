"""A training run's model and checkpoints: loading what it starts from, folder names, trainer state files, RNG
states, the model files and their generation config.

A checkpoint is a folder ``checkpoint-{step}`` in the Hugging Face layout plus ``trainer_state.json`` (step, data
position, metrics) and ``trainer_state.pt`` (optimizer and RNG states). :class:`pegasus_x.training.trainer.Trainer` writes
it into a temporary folder and renames it, so a run killed at any moment leaves the previous one intact; a folder
without both state files is therefore never a checkpoint.

The output folder's manifest (:data:`MANIFEST`) lists every entry a run created there; only those are ever replaced,
deleted or resumed from, so another tool's ``checkpoint-N`` or ``config.json`` is never taken for ours.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import TIED_KEYS, atomic_write_bytes
from ..config import PegasusXConfig
from ..errors import CheckpointError, ConfigError, GenerationError
from ..generate import resolve_options
from ..model import PegasusXForConditionalGeneration
from .options import PRESETS

STATE_JSON, STATE_PT = "trainer_state.json", "trainer_state.pt"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "pegasus-x-run.json"


def owned_entries(output_dir: str | Path) -> set[str]:
    """Names of the entries of ``output_dir`` that pegasus-x training runs created (its manifest; empty if none).

    Raises:
        CheckpointError: the manifest is unreadable.
    """
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        return set()
    try:
        names = json.loads(path.read_text(encoding="utf-8"))["created"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is damaged ({exc}), so which files a training run wrote there is unknown; "
                              "choose another --output-dir") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path} is damaged (\"created\" is not a list of names); choose another --output-dir")
    return set(names)


def write_manifest(output_dir: str | Path, names: set[str]) -> None:
    """Record (atomically) that the entries ``names`` of ``output_dir`` were created by a training run."""
    text = json.dumps({"tool": "pegasus-x train", "created": sorted(names)}, indent=2) + "\n"
    atomic_write_bytes(Path(output_dir) / MANIFEST, text.encode("utf-8"))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-{step}`` folder a run of ours wrote with the highest step, or None.

    Raises:
        CheckpointError: the folder's manifest is damaged.
    """
    folder = Path(output_dir)
    owned = owned_entries(folder)
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*")
             if (m := CHECKPOINT.match(p.name)) and p.name in owned and (p / STATE_JSON).is_file()
             and (p / STATE_PT).is_file()]
    return max(found)[1] if found else None


def load_model_and_tokenizer(spec: str, tokenizer: str | None = None, overrides: dict[str, Any] | None = None,
                             seed: int = 0) -> tuple[PegasusXForConditionalGeneration, Any]:
    """A model to train and its tokenizer.

    Args:
        spec: checkpoint folder, hub id, or preset name (random init; vocab_size follows the tokenizer).
        tokenizer: tokenizer folder; default: the checkpoint's own, or the shipped PEGASUS vocabulary for presets.
        overrides: config fields changed on a preset.
        seed: seed of the random initialisation.
    Raises:
        ConfigError / CheckpointError / TokenizerError: bad preset overrides or unreadable files.
    """
    from ..tokenizer import PegasusTokenizer

    if spec in PRESETS:
        tok = PegasusTokenizer.from_pretrained(tokenizer) if tokenizer else PegasusTokenizer.pegasus()
        try:
            config = PRESETS[spec](**{"vocab_size": tok.vocab_size, **(overrides or {})})
        except TypeError as exc:
            raise ConfigError(f"bad config override: {exc}") from None
        torch.manual_seed(seed)
        return PegasusXForConditionalGeneration(config), tok
    model = PegasusXForConditionalGeneration.from_pretrained(spec, dtype=torch.float32)
    return model, PegasusTokenizer.from_pretrained(tokenizer or spec)



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
    if set(missing) - set(TIED_KEYS):
        raise ConfigError(f"internal: gathered weights lack {sorted(missing)[:5]}")
    model.generation_config = dict(generation_config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def set_generation_config(model: PegasusXForConditionalGeneration, max_target_length: int,
                          given: dict[str, Any]) -> None:
    """Set the generation config a trained model is saved with, refused now if ``generate`` could not use it.

    Defaults for a model trained here (beam search, outputs up to ``max_target_length``), then the checkpoint's
    own ``generation_config``, then ``given`` (``--generation-config``).

    Raises:
        ConfigError: a value ``generate`` refuses, e.g. ``num_beams=-4``.
    """
    model.generation_config = {**_default_generation(model.config, max_target_length), **model.generation_config,
                               **given}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # the length cap warning is for generate's callers
            resolve_options(model, {}, torch.device("cpu"))
    except GenerationError as exc:
        raise ConfigError(f"the generation_config.json this run would save is invalid: {exc}; set the value with "
                          "--generation-config KEY=VALUE") from None


def _default_generation(config: PegasusXConfig, max_target_length: int) -> dict[str, Any]:
    """generation_config.json of a model trained here, unless the checkpoint or the options say otherwise."""
    return {"decoder_start_token_id": config.decoder_start_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id, "forced_eos_token_id": config.forced_eos_token_id,
            "num_beams": 4, "length_penalty": 0.8, "max_new_tokens": max_target_length}
