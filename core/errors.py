"""The one base class of every expected failure.

An entry point catches :class:`UserError` (and its subclasses) only, and prints it as one ``error:`` line;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a run that cannot go on as asked; the message says what to do instead."""


class DatasetError(UserError, ValueError):
    """Data that cannot be used as given (missing layout, too many unreadable files)."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot run (an unknown preset, a field of the wrong type, a resume that differs)."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept as it was."""


class RunDirBusy(UserError):
    """The run directory is held by another live run."""
