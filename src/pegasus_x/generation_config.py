"""`GenerationConfig`: a checkpoint's default generation options, resolved exactly as transformers 5.x does.

The one owner of generation defaults for the whole package (``generate``, ``Summarizer``, ``summarize()``, the CLI,
``evaluate``). For one call, each option comes from the first of:

1. the keyword arguments of ``generate`` (``max_new_tokens=...``);
2. a ``generation_config=`` passed to ``generate`` (its options that are set);
3. ``model.generation_config``: the checkpoint's ``generation_config.json`` when the folder has one, else the
   generation options found in its ``config.json`` (transformers 5 reads ``config.json`` only then: values there are
   ignored when ``generation_config.json`` exists, ``forced_eos_token_id`` included);
4. :data:`DEFAULTS` (transformers' global defaults).

Lengths follow transformers too: ``max_new_tokens`` (from any layer) wins over ``max_length``, which counts the
decoder start token; when no layer sets either, 20 new tokens (capped by ``max_position_embeddings``). A stored
``max_length`` is used as it is (the hub files' 16384 means up to 16383 new tokens, normally ended by EOS). Special
tokens too: without ``eos_token_id`` nothing stops generation early; without ``pad_token_id`` the first EOS id pads;
without ``decoder_start_token_id``, ``bos_token_id`` starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import CheckpointError, GenerationError
from .files import atomic_write_bytes, json_text
from .strict_json import read_object

GENERATION_CONFIG = "generation_config.json"
DEFAULT_MAX_NEW_TOKENS = 20   # transformers' max_length=20 counts the prompt: for a decoder, the start token

# Options a generation config can hold, with the value used when no layer sets one (transformers' global
# defaults; None = off / not set). ``gnmt_alpha`` is ours: ((5+len)/6)**alpha length normalisation.
# ``prompt_lookup_num_tokens`` (transformers' name): draft up to that many tokens from the source and the output
# and verify them in one decoder pass (:mod:`pegasus_x.lookahead`); None or 0 = off.
DEFAULTS: dict[str, Any] = dict(
    max_new_tokens=None, max_length=None, min_new_tokens=None, min_length=0, num_beams=1, length_penalty=1.0,
    gnmt_alpha=None, early_stopping=False, num_return_sequences=1, do_sample=False, temperature=1.0, top_k=50,
    top_p=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, repetition_penalty=1.0, bad_words_ids=None,
    forced_eos_token_id=None, eos_token_id=None, pad_token_id=None, bos_token_id=None, decoder_start_token_id=None,
    output_scores=False, return_dict_in_generate=False, prompt_lookup_num_tokens=None)
# Arguments of one generate call that no config holds.
RUNTIME_OPTIONS: dict[str, Any] = dict(generator=None, seed=None, streamer=None)


class GenerationConfig:
    """Generation defaults with transformers' interface: attribute access (None when unset), :meth:`to_dict`,
    :meth:`save_pretrained`, :meth:`from_pretrained`, :meth:`from_model_config`.

    Keys it does not know (``transformers_version``, ``use_cache``, ...) are kept and written back unchanged. It
    also reads like the dict it replaces (``config["num_beams"]``, ``config.get(...)``, ``dict(config)``) over the
    keys that are set.

    Args:
        **options: option values; see :data:`DEFAULTS` for the names generation uses.
    """

    def __init__(self, **options: Any) -> None:
        for name in DEFAULTS:
            setattr(self, name, None)
        for name, value in options.items():
            setattr(self, name, value)

    # -- transformers' interface ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        """A config holding ``data``'s keys.

        Raises:
            GenerationError: ``data`` is not a dictionary with string keys.
        """
        if not isinstance(data, dict) or not all(isinstance(k, str) and k.isidentifier() for k in data):
            raise GenerationError(f"a generation config must be a JSON object with option names as keys, got {data!r}")
        clash = sorted(k for k in data if hasattr(cls, k))     # e.g. "keys": it would hide the method
        if clash:
            raise GenerationError(f"a generation config cannot hold the key(s) {clash}; rename or remove them")
        return cls(**data)

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """The generation options found in a model config (a :class:`PegasusXConfig` or a ``config.json`` dict):
        what transformers 5 uses for a checkpoint folder without ``generation_config.json``."""
        data = config if isinstance(config, dict) else config.to_dict()
        return cls(**{k: data[k] for k in DEFAULTS if data.get(k) is not None})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> GenerationConfig:
        """The defaults of a checkpoint folder: its ``generation_config.json``, or without one the generation
        options of its ``config.json`` (see the module docstring).

        Raises:
            CheckpointError: a file is too large or not a valid JSON object (:func:`strict_json.read_object`).
        """
        folder = Path(folder)
        file = folder / GENERATION_CONFIG
        if file.is_file():
            return cls.from_dict(read_object(file, CheckpointError, fix="fix or delete it"))
        config = folder / "config.json"
        if not config.is_file():
            return cls()
        return cls.from_model_config(read_object(config, CheckpointError, fix="re-download or rewrite it"))

    def to_dict(self) -> dict[str, Any]:
        """Every option (None where unset) and every kept key."""
        return dict(vars(self))

    def to_diff_dict(self) -> dict[str, Any]:
        """The keys that are set: what :meth:`save_pretrained` writes."""
        return {k: v for k, v in vars(self).items() if v is not None}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``generation_config.json`` into ``directory`` atomically; returns the file path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / GENERATION_CONFIG
        text = json_text(self.to_diff_dict(), f"the generation config for {directory}", indent=2)
        atomic_write_bytes(file, (text + "\n").encode())
        return file

    def update(self, **options: Any) -> dict[str, Any]:
        """Set the given options; returns the ones this config does not know (like transformers)."""
        unused = {k: v for k, v in options.items() if k not in vars(self)}
        for name, value in options.items():
            if name not in unused:
                setattr(self, name, value)
        return unused

    def __repr__(self) -> str:
        return f"GenerationConfig {json.dumps(self.to_diff_dict(), indent=2, default=str)}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationConfig) and self.to_diff_dict() == other.to_diff_dict()

    # -- the dict it replaces ------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.to_diff_dict())

    def __getitem__(self, name: str) -> Any:
        value = vars(self).get(name)
        if value is None:
            raise KeyError(name)
        return value

    def get(self, name: str, default: Any = None) -> Any:
        value = vars(self).get(name)
        return default if value is None else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and vars(self).get(name) is not None


def as_generation_config(value: Any) -> GenerationConfig:
    """``value`` as a :class:`GenerationConfig`: one as it is; a dict, or an object with ``to_dict()`` (such as
    transformers' GenerationConfig), by its keys; None as an empty one.

    Raises:
        GenerationError: anything else.
    """
    if isinstance(value, GenerationConfig):
        return value
    if value is None:
        return GenerationConfig()
    if isinstance(value, dict):
        return GenerationConfig.from_dict(value)
    if callable(getattr(value, "to_dict", None)):
        return GenerationConfig.from_dict({k: v for k, v in value.to_dict().items() if v is not None})
    raise GenerationError(f"generation_config must be a GenerationConfig or a dict, got {type(value).__name__}")


def merge(stored: GenerationConfig, given: GenerationConfig | None, call: dict[str, Any]
          ) -> tuple[dict[str, Any], bool]:
    """Each option of :data:`DEFAULTS` from the first layer that sets it (call, ``given``, ``stored``, defaults),
    and whether no layer set ``max_length``. In ``call`` a None length means "not given"; any other None is a
    value (``forced_eos_token_id=None`` turns forcing off)."""
    layers = [c.to_diff_dict() for c in (given, stored) if c is not None]
    call = {k: v for k, v in call.items() if not (v is None and k in ("max_new_tokens", "max_length",
                                                                       "min_new_tokens", "min_length"))}
    value = {}
    for name, default in DEFAULTS.items():
        value[name] = call[name] if name in call else next((d[name] for d in layers if name in d), default)
    no_max_length = "max_length" not in call and all("max_length" not in d for d in layers)
    return value, no_max_length
