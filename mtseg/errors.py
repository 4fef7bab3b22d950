"""The base class of every error mtseg raises on purpose; the bottom layer, importing nothing from mtseg.

Each module keeps its own subclass (``ConfigError``, ``StorageError``, ...), most also deriving
from ``ValueError`` or ``RuntimeError``; the command line prints one as ``mtseg: error: <message>``.
"""

from __future__ import annotations


class MtsegError(Exception):
    """An error with a one-line message for the user (a config key, a path, an argument), not a traceback.

    Attributes:
        exit_code: what ``mtseg`` exits with: 2, bad input or an unusable environment, unless a
            subclass says otherwise.
    """

    exit_code: int = 2
