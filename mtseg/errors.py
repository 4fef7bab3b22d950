"""The base class of every error mtseg raises on purpose.

An :class:`MtsegError` carries a one-line message naming what was wrong (a config key, a path,
an argument) and is meant for the user, not a traceback: the command line prints it as
``mtseg: error: <message>`` and exits with its :attr:`~MtsegError.exit_code`. Each module keeps
its own subclass (``ConfigError``, ``StorageError``, ...), and most also derive from
``ValueError`` or ``RuntimeError`` so that callers catching those keep working.

This module is the bottom layer of the package: it imports nothing from mtseg.
"""

from __future__ import annotations


class MtsegError(Exception):
    """An error with a one-line message for the user.

    Attributes:
        exit_code: what ``mtseg`` exits with when the error ends a command: 2, bad input or an
            unusable environment (config, data, storage, cluster), unless a subclass says otherwise.
    """

    exit_code: int = 2


__all__ = ["MtsegError"]
