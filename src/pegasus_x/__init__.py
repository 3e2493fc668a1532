"""pegasus_x: PEGASUS-X long-document summarization in plain PyTorch.

The public names load on first use (module ``__getattr__``), so ``import pegasus_x.tokenizer`` or
``pegasus_x.config`` does not import torch; ``from pegasus_x import PegasusXForConditionalGeneration`` does.
"""

import importlib
import sys
import types

from .errors import (CheckpointError, ConfigError, DataError, GenerationError, InputError, PegasusXError,
                     TokenizerError)

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_LAZY = {"PegasusXConfig": "config", "GenerationConfig": "generation_config", "PegasusXModel": "model",
         "PegasusXForConditionalGeneration": "model", "Summarizer": "summarize", "Summary": "summarize",
         "TextStreamer": "summarize", "summarize": "summarize", "PegasusTokenizer": "tokenizer"}

__all__ = [
    "PegasusXConfig", "PegasusXModel", "PegasusXForConditionalGeneration", "PegasusTokenizer", "GenerationConfig",
    "Summarizer",
    "Summary", "TextStreamer", "summarize", "PegasusXError", "ConfigError", "CheckpointError", "InputError",
    "GenerationError", "TokenizerError", "DataError", "__version__",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's module type: importing the submodule ``pegasus_x.summarize`` (the CLI does) would bind the
    package attribute ``summarize`` to that module, hiding the function of the same name; the function wins."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
