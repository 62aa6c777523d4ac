"""One error type for everything a person can act on.

A :class:`MedsegError` carries one sentence that says what is wrong and what to do. The CLI prints
it on one line (exit 1, or 2 for bad usage); widgets show it as a notification.
"""

from __future__ import annotations


class MedsegError(Exception):
    """An error with a message a person can act on."""

    exit_code = 1


class UsageError(MedsegError):
    """The command or call was used wrongly (bad option, unknown model name)."""

    exit_code = 2


class InputError(MedsegError):
    """An input file or array cannot be used (missing, unreadable, corrupt, wrong shape)."""


class ModelError(MedsegError):
    """A model or pack cannot be used (unknown, tampered, incompatible with the input)."""


class Cancelled(MedsegError):
    """The operation was cancelled by the user; nothing was written."""

    def __init__(self, message: str = "Cancelled: nothing was written.") -> None:
        super().__init__(message)
