"""User-facing errors. Each message says what was wrong and what is allowed.

The CLI prints ``error: <message>`` and exits 2; the service maps these to 4xx answers.
"""


class MalereiError(Exception):
    """Base of every error a user can cause (bad input, missing model, ...)."""


class InvalidParameter(MalereiError, ValueError):
    """A parameter is out of range or of the wrong kind."""


class ModelNotFound(MalereiError, FileNotFoundError):
    """A model name or path names nothing loadable."""


class ModelLoadError(MalereiError):
    """A model file exists but cannot be read (corrupt, unknown layout)."""


class PickleRefused(ModelLoadError):
    """A pickle-based checkpoint was given without the explicit opt-in."""


class ImageError(MalereiError):
    """An input image cannot be read or is unacceptable (corrupt, too large, wrong format)."""


class Cancelled(MalereiError):
    """A job was cancelled while it ran."""
