"""`PegasusXConfig`: the fields of the reference `config.json`, validated, with the released presets."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import CheckpointError, ConfigError
from .files import atomic_write_bytes, json_text
from .strict_json import read_object

CONFIG_NAME = "config.json"
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "swish", "tanh")
# The largest value each size may take: far beyond any released or plausible PEGASUS-X shape (the released models
# use at most 16 layers, d_model 1024, block 512), so a typo such as 10**9 layers is refused before anything is
# built. What fits this machine is a separate check (check_fits_in_memory).
CEILINGS: dict[str, int] = dict(
    vocab_size=2**21, max_position_embeddings=2**24, d_model=2**15, encoder_layers=1024, decoder_layers=1024,
    encoder_attention_heads=1024, decoder_attention_heads=1024, encoder_ffn_dim=2**18, decoder_ffn_dim=2**18,
    num_global_tokens=2**14, block_size=2**16)


@dataclass
class PegasusXConfig:
    """Hyper-parameters of a PEGASUS-X model; field names and defaults equal the reference `config.json` keys.

    Keys this library does not use (the hub files carry legacy ones such as ``normalize_before`` or ``id2label``)
    are kept in ``extra`` and written back unchanged by :meth:`save_pretrained`.

    Every field is type-checked (``"false"`` is not a boolean, ``True`` is not a size, numbers are finite) and
    every size is checked against :data:`CEILINGS`; whether the model fits this machine's memory is checked when
    one is built (:func:`check_fits_in_memory`).

    Raises:
        ConfigError: a field of the wrong type, a size that is not positive or is above its ceiling, ``d_model``
            not divisible by the head count, ``block_size`` odd while staggering is on, or an unknown activation.
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
        for f in dataclasses.fields(self):
            if f.name in CEILINGS or f.name == "extra":
                continue
            _check_type(f.name, getattr(self, f.name), str(f.type))
        for name, ceiling in CEILINGS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.{name} must be a positive integer, got {value!r}")
            if value > ceiling:
                raise ConfigError(f"config.{name}={value:,} is larger than the ceiling {ceiling:,} (far beyond any "
                                  "PEGASUS-X model); check config.json for a typo")
        for name in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "decoder_layerdrop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"config.{name} must be a probability in [0, 1), got {value!r}")
        if self.init_std < 0:
            raise ConfigError(f"config.init_std must be >= 0, got {self.init_std!r}")
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
        if not 0 < self.layer_norm_eps < 1:
            raise ConfigError(f"config.layer_norm_eps must be a small positive number, got {self.layer_norm_eps!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(f"config.activation_function={self.activation_function!r} is unknown; "
                              f"use one of {', '.join(ACTIVATIONS)}")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id", "forced_eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
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
            CheckpointError: the file is missing, too large, or not a valid JSON object.
            ConfigError: its values are invalid.
        """
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"no {CONFIG_NAME} in {path}; a checkpoint folder holds config.json and "
                                  "model.safetensors (or pytorch_model.bin)")
        return cls.from_dict(read_object(file, CheckpointError, fix="re-download or rewrite it"))

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


_EXPECTED = {"bool": "true or false (a JSON boolean, not a string)", "int": "an integer",
             "int | None": "an integer or null", "float": "a finite number", "str": "a string"}


def _check_type(name: str, value: Any, kind: str) -> None:
    """Refuse a value of the wrong JSON type: ``"false"`` would count as true, ``true`` as 1."""
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind in ("int", "int | None"):
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (value is None and kind != "int")
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"config.{name} must be {_EXPECTED[kind]}, got {value!r}")


# ---------------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryEstimate:
    """What a model of a config needs at least, before anything is allocated.

    Attributes:
        parameters: parameter count of ``PegasusXForConditionalGeneration`` (tied embedding counted once).
        parameter_bytes: their size at the given bytes per value.
        activation_bytes: the largest single run-time tensor of the smallest input (batch 1, one block): the
            fp32 block-attention scores at the configured ``block_size``, the FFN activations or the logits.
    """

    parameters: int
    parameter_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.activation_bytes


def estimate_memory(config: PegasusXConfig, bytes_per_value: int = 4) -> MemoryEstimate:
    """The parameter count and the least memory a model of ``config`` needs, from the sizes alone.

    Args:
        config: the model's config.
        bytes_per_value: bytes per parameter (4 for fp32, 2 for bf16).
    """
    d, ffn_e, ffn_d, vocab = config.d_model, config.encoder_ffn_dim, config.decoder_ffn_dim, config.vocab_size
    layer_norm = 2 * d
    # Attention: q/k/v/out without bias (the decoder has self- and cross-attention); fc1 and fc2 with biases.
    encoder_layer = 4 * d * d + 3 * layer_norm + 2 * d * ffn_e + ffn_e + d
    decoder_layer = 8 * d * d + 3 * layer_norm + 2 * d * ffn_d + ffn_d + d
    params = (vocab * d + config.num_global_tokens * d + config.encoder_layers * encoder_layer + layer_norm
              + config.decoder_layers * decoder_layer + layer_norm + (0 if config.tie_word_embeddings else vocab * d))
    # Even a one-token input is padded to a whole block (two when odd layers are staggered).
    K, G, heads = config.block_size, config.num_global_tokens, config.encoder_attention_heads
    blocks = 2 if config.stagger_local_blocks else 1
    largest = max(blocks * heads * K * (G + K), heads * G * (G + blocks * K), (G + blocks * K) * ffn_e, vocab)
    return MemoryEstimate(params, params * bytes_per_value, largest * 4)    # scores and softmax run in fp32


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (the cgroup limit when lower); None when unknown."""
    total = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            found = re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.MULTILINE)
        total = int(found.group(1)) * 1024 if found else None
    except OSError:
        pass
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def check_fits_in_memory(config: PegasusXConfig, bytes_per_value: int = 4, available: int | None = None
                         ) -> MemoryEstimate:
    """Refuse a model that cannot fit in this machine's memory, before anything is allocated.

    Args:
        config: the model's config.
        bytes_per_value: bytes per parameter (4 for fp32, 2 for bf16).
        available: memory in bytes; default :func:`machine_memory` (nothing is refused when it is unknown).

    Returns:
        The estimate.

    Raises:
        ConfigError: the parameters plus the largest run-time tensor need more than ``available``; the message
            says how much.
    """
    estimate = estimate_memory(config, bytes_per_value)
    available = machine_memory() if available is None else available
    if available is not None and estimate.total_bytes > available:
        raise ConfigError(
            f"this model needs at least {_gb(estimate.total_bytes)} ({estimate.parameters:,} parameters at "
            f"{bytes_per_value} bytes = {_gb(estimate.parameter_bytes)}, plus {_gb(estimate.activation_bytes)} for "
            f"the largest run-time tensor at block_size {config.block_size}), but this machine has "
            f"{_gb(available)}; check the sizes in config.json or use a machine with more memory")
    return estimate


def _gb(size: int) -> str:
    return f"{size / 1e9:,.1f} GB" if size >= 1e8 else f"{size / 1e6:,.1f} MB"
