"""The project's exceptions.

Every failure a user can cause (bad folder, bad tensor, bad configuration)
raises a subclass of :class:`OBIMError` whose message names the file or tensor
and says what to do. The CLI prints that message alone, without a traceback.
"""

from __future__ import annotations


class OBIMError(Exception):
    """Base class of every error the user can fix."""


class ConfigError(OBIMError, ValueError):
    """Invalid configuration: unknown method, bad parameter, ratios summing above 1, ..."""


class CheckpointError(OBIMError):
    """A checkpoint or base folder is missing, unreadable, corrupt or inconsistent with the others."""


class CalibrationError(OBIMError):
    """Calibration data is missing, empty or unreadable, or statistics cannot be used."""


class OutputError(OBIMError):
    """The output folder cannot be written as asked (exists, lies inside an input, ...)."""
