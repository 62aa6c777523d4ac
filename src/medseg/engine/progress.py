"""Progress events, cancel tokens and the synchronous wrapper shared by every long operation.

Long work is written once as a generator that yields :class:`Progress` and *returns* its result.
The GUI runs that generator in napari's ``thread_worker``; the CLI wraps it in a terminal progress
bar; tests and scripts call :func:`run_sync`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Generator, TypeVar

from medseg.errors import Cancelled

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One progress event: ``done`` of ``total`` units, a message and an optional partial result."""

    done: int
    total: int
    message: str = ""
    partial: Any = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


class CancelToken:
    """Thread-safe flag checked by long operations between batches."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled()


def check_cancel(token: CancelToken | None) -> None:
    """Raise :class:`Cancelled` when ``token`` was cancelled (``None`` never cancels)."""
    if token is not None:
        token.raise_if_cancelled()


Job = Generator[Progress, None, T]


def run_sync(job: Job[T], on_progress: Callable[[Progress], None] | None = None) -> T:
    """Drive a progress generator to its end and return its result."""
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(event)
