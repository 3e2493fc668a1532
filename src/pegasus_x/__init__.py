"""pegasus_x: PEGASUS-X long-document summarization in plain PyTorch."""

from .config import PegasusXConfig
from .errors import (CheckpointError, ConfigError, DataError, GenerationError, InputError, PegasusXError,
                     TokenizerError)
from .generation_config import GenerationConfig
from .model import PegasusXForConditionalGeneration, PegasusXModel
from .summarize import Summarizer, Summary, TextStreamer, summarize
from .tokenizer import PegasusTokenizer

__version__ = "0.1.0"

__all__ = [
    "PegasusXConfig", "PegasusXModel", "PegasusXForConditionalGeneration", "PegasusTokenizer", "GenerationConfig",
    "Summarizer",
    "Summary", "TextStreamer", "summarize", "PegasusXError", "ConfigError", "CheckpointError", "InputError",
    "GenerationError", "TokenizerError", "DataError", "__version__",
]
