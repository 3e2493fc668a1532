"""Model outputs: small dataclasses that also behave like transformers' ``ModelOutput``.

Like there, the fields that are not None act as an ordered dict: ``out["logits"]``, ``"loss" in out``,
``out.keys()``, iteration over the keys, ``len(out)``; an integer or slice indexes :meth:`ModelOutput.to_tuple`
(the non-None values in field order), so ``out[0]`` is the loss when there is one and the logits otherwise, as in
a script written for transformers. Field order follows the reference classes for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch
from torch import Tensor

from .errors import InputError


class ModelOutput:
    """Dict-and-tuple access over a dataclass's non-None fields (see the module docstring)."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        """The non-None fields' values, in field order."""
        return tuple(self.values())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default


@dataclass(eq=False)
class EncoderOutput(ModelOutput):
    """``last_hidden_state`` ``(B, T, D)`` and the ``attention_mask`` ``(B, T)`` bool it was computed with."""

    last_hidden_state: Tensor
    attention_mask: Tensor | None = None


@dataclass(eq=False)
class Seq2SeqOutput(ModelOutput):
    """Output of :class:`PegasusXModel`: decoder states ``(B, T_dec, D)`` and encoder states ``(B, T, D)``."""

    last_hidden_state: Tensor
    encoder_last_hidden_state: Tensor | None = None


@dataclass(eq=False, kw_only=True)
class Seq2SeqLMOutput(ModelOutput):
    """Output of :class:`PegasusXForConditionalGeneration`.

    ``loss`` (mean cross-entropy over labels ≠ -100) when labels were given; ``logits`` ``(B, T_dec, V)``;
    ``encoder_last_hidden_state`` ``(B, T, D)``.
    """

    loss: Tensor | None = None
    logits: Tensor
    encoder_last_hidden_state: Tensor | None = None


@dataclass(eq=False)
class GenerateOutput(ModelOutput):
    """``sequences`` ``(B·num_return_sequences, L)``; ``sequences_scores`` ``(B·num_return_sequences,)`` (the
    length-penalised beam scores; None for greedy search and sampling); ``decoder_passes``: how many times the
    decoder ran (one per token without lookahead; fewer with ``prompt_lookup_num_tokens``)."""

    sequences: Tensor
    sequences_scores: Tensor | None = None
    decoder_passes: int | None = None


def encoder_inputs(encoder_outputs: Any, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(states ``(B, T, D)``, keep ``(B, T)`` bool) of precomputed encoder outputs.

    Takes our :class:`EncoderOutput`, anything with ``last_hidden_state`` (transformers' ``BaseModelOutput``), or a
    tuple whose first item is the states. The mask: ``attention_mask`` when given, else the output's own, else
    every position real.

    Raises:
        InputError: no states tensor, or a mask whose shape does not match it.
    """
    states = getattr(encoder_outputs, "last_hidden_state", None)
    if states is None and isinstance(encoder_outputs, (tuple, list)) and encoder_outputs:
        states = encoder_outputs[0]
    if not isinstance(states, Tensor) or states.dim() != 3:
        raise InputError("encoder_outputs must hold last_hidden_state, a (batch, length, d_model) tensor, e.g. "
                         "model.get_encoder()(input_ids=ids, attention_mask=mask)")
    mask = attention_mask if attention_mask is not None else getattr(encoder_outputs, "attention_mask", None)
    if mask is None:
        return states, torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(states.shape[:2]):
        raise InputError(f"attention_mask must have shape {tuple(states.shape[:2])} to match encoder_outputs, got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    return states, mask.to(states.device).bool() if mask.dtype != torch.bool else mask.to(states.device)
