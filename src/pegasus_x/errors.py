"""One exception family for everything a user can get wrong.

Every error the library raises on purpose derives from :class:`PegasusXError`, so callers can catch
one type. Each subclass also derives from the built-in exception that matches its meaning
(``ValueError``, ``OSError``, ...) so generic ``except ValueError`` code keeps working.
Messages name the problem *and* the fix.
"""


class PegasusXError(Exception):
    """Base class of every error raised on purpose by pegasus_x."""


class ConfigError(PegasusXError, ValueError):
    """A configuration value is invalid or inconsistent."""


class CheckpointError(PegasusXError, OSError):
    """A checkpoint folder or file is missing, unreadable, unsafe or does not match the config."""


class InputError(PegasusXError, ValueError):
    """A tensor, text or file given to a public entry point is malformed."""


class GenerationError(PegasusXError, ValueError):
    """A generation option is out of range or inconsistent with the others."""


class TokenizerError(PegasusXError, ValueError):
    """A tokenizer file is missing or a text input is not text."""


class DataError(PegasusXError, ValueError):
    """A training or evaluation dataset is empty, missing columns or unreadable."""


class RequestError(InputError):
    """A request to ``pegasus-x serve`` cannot be served: ``status`` is its HTTP status, ``field`` the request field
    at fault (None when the request as a whole is)."""

    def __init__(self, message: str, status: int = 422, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
