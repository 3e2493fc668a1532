"""`PegasusXConfig`: the fields of the reference `config.json`, validated, with the released presets."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import CheckpointError, ConfigError
from .files import atomic_write_bytes, json_text

CONFIG_NAME = "config.json"
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "swish", "tanh")


@dataclass
class PegasusXConfig:
    """Hyper-parameters of a PEGASUS-X model; field names and defaults equal the reference `config.json` keys.

    Keys this library does not use (the hub files carry legacy ones such as ``normalize_before`` or ``id2label``)
    are kept in ``extra`` and written back unchanged by :meth:`save_pretrained`.

    Raises:
        ConfigError: a size is not positive, ``d_model`` is not divisible by the head count, ``block_size`` is odd
            while staggering is on, or the activation is unknown.
    """

    model_type: ClassVar[str] = "pegasus_x"     # as transformers' config: a class constant, not a config.json field
    vocab_size: int = 96103
    max_position_embeddings: int = 16384
    d_model: int = 1024
    encoder_layers: int = 16
    decoder_layers: int = 16
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation_function: str = "gelu"
    init_std: float = 0.02
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    use_cache: bool = True
    scale_embedding: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    forced_eos_token_id: int | None = 1
    num_global_tokens: int = 32
    block_size: int = 512
    stagger_local_blocks: bool = True
    tie_word_embeddings: bool = True
    layer_norm_eps: float = 1e-5      # not in the reference config (always 1e-5 there); 1e-12 for Flax conversions
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_position_embeddings", "d_model", "encoder_layers", "decoder_layers",
                     "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                     "num_global_tokens", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.{name} must be a positive integer, got {value!r}")
        for name in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "decoder_layerdrop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"config.{name} must be a probability in [0, 1), got {value!r}")
        for heads in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, heads):
                raise ConfigError(f"config.d_model={self.d_model} is not divisible by config.{heads}="
                                  f"{getattr(self, heads)}; choose a head count that divides d_model")
        if self.d_model % 2 or self.d_model < 4:
            raise ConfigError(f"config.d_model={self.d_model} must be even and >= 4 (sinusoidal positions use "
                              "d_model/2 - 1 as a divisor)")
        if self.stagger_local_blocks and self.block_size % 2:
            raise ConfigError(f"config.block_size={self.block_size} must be even when stagger_local_blocks is on "
                              "(odd layers shift blocks by block_size/2); use an even size or turn staggering off")
        if not isinstance(self.layer_norm_eps, (int, float)) or not 0 < self.layer_norm_eps < 1:
            raise ConfigError(f"config.layer_norm_eps must be a small positive number, got {self.layer_norm_eps!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(f"config.activation_function={self.activation_function!r} is unknown; "
                              f"use one of {', '.join(ACTIVATIONS)}")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"config.{name}={value!r} must be a token id in [0, vocab_size={self.vocab_size})")

    # -- presets -----------------------------------------------------------------------------------------------
    @classmethod
    def base(cls, **overrides: Any) -> "PegasusXConfig":
        """The shape of `google/pegasus-x-base` (272M parameters)."""
        return cls(**{**_released(768, 12, 12, 3072), **overrides})

    @classmethod
    def large(cls, **overrides: Any) -> "PegasusXConfig":
        """The shape of `google/pegasus-x-large` (569M parameters)."""
        return cls(**{**_released(1024, 16, 16, 4096), **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> "PegasusXConfig":
        """A few-hundred-thousand-parameter shape for tests and quick experiments (full PEGASUS vocabulary)."""
        sizes = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_global_tokens=8,
                     block_size=16, activation_function="relu")
        return cls(**{**sizes, **overrides})

    # -- (de)serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The `config.json` content: every field plus the kept unknown keys."""
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        out["model_type"] = self.model_type
        out.setdefault("architectures", ["PegasusXForConditionalGeneration"])
        out.setdefault("is_encoder_decoder", True)
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PegasusXConfig":
        """Build a config from a `config.json` dictionary; unknown keys go to ``extra``.

        Raises:
            ConfigError: not a dictionary, a model type other than pegasus_x, or an invalid value.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "pegasus_x")
        if model_type != "pegasus_x":
            raise ConfigError(f"config.json has model_type={model_type!r}, expected 'pegasus_x'; for a PEGASUS "
                              "checkpoint run `pegasus-x convert pegasus` first")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k not in ("model_type",)}
        try:
            return cls(**known, extra=extra)
        except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
            raise ConfigError(f"invalid config: {exc}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "PegasusXConfig":
        """Read ``config.json`` from a checkpoint folder (or the file itself).

        Raises:
            CheckpointError: the file is missing or not valid JSON.
            ConfigError: its values are invalid.
        """
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"no {CONFIG_NAME} in {path}; a checkpoint folder holds config.json and "
                                  "model.safetensors (or pytorch_model.bin)")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{file} is not valid JSON ({exc}); re-download or rewrite it") from None
        return cls.from_dict(data)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` into ``directory`` atomically; returns the file path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / CONFIG_NAME
        text = json_text(self.to_dict(), f"the config of {directory}", indent=2)
        atomic_write_bytes(file, (text + "\n").encode())
        return file

    def replace(self, **changes: Any) -> "PegasusXConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _released(d_model: int, layers: int, heads: int, ffn: int) -> dict[str, Any]:
    return dict(d_model=d_model, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, activation_function="relu",
                dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, num_global_tokens=128, block_size=512,
                stagger_local_blocks=True)
