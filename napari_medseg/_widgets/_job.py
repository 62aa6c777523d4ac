"""One core job at a time, off the GUI thread, wired to a dock's buttons, progress bar and status line.

Every medseg dock runs its work the same way: a core generator that yields
:class:`~medseg.engine.Progress` events and returns a result runs in napari's ``thread_worker``; the
dock's Run button is disabled and its Cancel button enabled while it runs; progress drives the dock's
bar and napari's activity bar; a :class:`~medseg.errors.MedsegError` (bad input, a cancel) becomes one
sentence in the status line and a notification, never a crash; anything else is a bug and becomes an
error notification that carries its traceback. :class:`JobRunner` is that, once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

from magicgui.widgets import Label, ProgressBar, PushButton
from napari.qt.threading import thread_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info

from medseg.engine import CancelToken, Progress
from medseg.errors import Cancelled, MedsegError


@dataclass(frozen=True)
class Refused:
    """A job that ended with a :class:`MedsegError` (returned, not raised: ``thread_worker`` treats raised
    exceptions as crashes with tracebacks, but these are messages for a person)."""

    error: MedsegError


def refusing(job: Callable[..., Generator[Progress, None, Any]]) -> Callable[..., Generator[Progress, None, Any]]:
    """Wrap a core job so that a :class:`MedsegError` comes back as :class:`Refused`."""

    @functools.wraps(job)
    def wrapped(*args, **kwargs):
        try:
            return (yield from job(*args, **kwargs))
        except MedsegError as exc:
            return Refused(exc)

    return wrapped


def _run_job(job: Callable[..., Generator[Progress, None, Any]], args: tuple, kwargs: dict):
    return (yield from refusing(job)(*args, **kwargs))


# Anything else raised in a job is a bug: the runner reports it with its traceback rather than letting
# the worker re-raise it in the event loop.
_worker_factory = thread_worker(_run_job, ignore_errors=True)


class JobRunner:
    """Runs one job at a time for a dock and reports on its widgets (any of which may be left out).

    ``start(job, *args, description=..., on_result=...)`` runs ``job(*args, cancel=token)`` when
    ``pass_cancel`` is true (the default), calls ``on_result`` on the GUI thread with what the job
    returned (a :class:`Refused` is reported here and never reaches ``on_result``), ``on_progress`` (if
    given) on each event after the bar and status are updated, and ``on_done`` (if given) when the job
    has ended whatever the outcome.
    """

    def __init__(self, *, run_buttons: Sequence[PushButton] = (), cancel_button: PushButton | None = None,
                 bar: ProgressBar | None = None, status: Label | None = None) -> None:
        self.run_buttons, self.cancel_button, self.bar, self.status = list(run_buttons), cancel_button, bar, status
        self.worker = None
        self.cancel_token: CancelToken | None = None
        self.last_message = ""
        self._pbar: progress | None = None
        self._on_result: Callable[[Any], None] | None = None
        self._on_done: Callable[[], None] | None = None
        self._on_event: Callable[[Progress], None] | None = None
        self._completed = False  # the last job returned a result (the bar then stays full)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, job: Callable[..., Generator[Progress, None, Any]], *args, description: str,
              on_result: Callable[[Any], None], on_done: Callable[[], None] | None = None,
              on_progress: Callable[[Progress], None] | None = None, pass_cancel: bool = True, **kwargs):
        """Start ``job``; returns the worker, or ``None`` when a job is already running."""
        if self.worker is not None:
            return None
        self.cancel_token = CancelToken()
        if pass_cancel:
            kwargs["cancel"] = self.cancel_token
        worker = _worker_factory(job, args, kwargs)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_unexpected_error)
        try:  # napari's own relay (not wired up in napari 0.9.2); keep one notification per error
            worker.errored.disconnect(worker._relay_error)
        except (AttributeError, TypeError, RuntimeError):
            pass
        worker.finished.connect(self._on_finished)
        self.worker, self._on_result, self._on_done, self._on_event = worker, on_result, on_done, on_progress
        self._completed = False
        self._set_running(True)
        self._pbar = progress(total=0, desc=description)
        self._set_status(f"{description}...")
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running job to stop at its next check (after the current batch or item)."""
        if self.cancel_token is not None and self.worker is not None:
            self.cancel_token.cancel()
            self._set_status("cancelling...")

    def report(self, message: str, level: str = "status") -> None:
        """Show one sentence in the status line; ``error``/``info`` also raise a notification."""
        self.last_message = message
        self._set_status(message)
        if level == "error":
            show_error(message)
        elif level == "info":
            show_info(message)

    # ------------------------------------------------------------------ worker callbacks (GUI thread)
    def _on_progress(self, event: Progress) -> None:
        if self.worker is None:  # a late event of a job that has already ended
            return
        if self.bar is not None:
            if event.total <= 0:
                self.bar.max = 0  # busy indicator
            else:
                self.bar.max = event.total
                self.bar.value = event.done
        self._set_status(event.message)
        if self._on_event is not None:
            self._on_event(event)
        # last: napari's progress bar may process pending events (even this job's end) while it updates
        pbar = self._pbar
        if pbar is not None:
            if pbar.total != event.total:
                pbar.total = event.total
            if event.done > pbar.n:
                pbar.update(event.done - pbar.n)

    def _on_returned(self, outcome: Any) -> None:
        if isinstance(outcome, Refused):
            self.report(str(outcome.error), "info" if isinstance(outcome.error, Cancelled) else "error")
            return
        self._completed = True
        if self._on_result is not None:
            self._on_result(outcome)

    def _on_unexpected_error(self, exc: Exception) -> None:
        """A bug, not a bad input: an error notification that carries the traceback."""
        from napari.utils.notifications import notification_manager

        self.last_message = f"failed: {type(exc).__name__}: {exc}"
        self._set_status(self.last_message)
        notification_manager.receive_error(type(exc), exc, exc.__traceback__)

    def _on_finished(self) -> None:
        on_done = self._on_done
        self.worker = self.cancel_token = self._on_result = self._on_done = self._on_event = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._set_running(False)
        if on_done is not None:
            on_done()

    def _set_running(self, running: bool) -> None:
        for button in self.run_buttons:  # the buttons that start jobs: off while one runs
            button.enabled = not running
        if self.cancel_button is not None:
            self.cancel_button.enabled = running
        if not running and self.bar is not None:  # done: full; refused, cancelled or failed: empty
            self.bar.max = max(self.bar.max, 1)
            self.bar.value = self.bar.max if self._completed else 0

    def _set_status(self, message: str) -> None:
        if self.status is not None:
            self.status.value = message


class JobDock:
    """What every dock with a :class:`JobRunner` in ``self.jobs`` offers its users and tests."""

    jobs: JobRunner

    def cancel(self, _value=None) -> None:
        """Ask the running job to stop at its next check."""
        self.jobs.cancel()

    @property
    def running(self) -> bool:
        return self.jobs.running

    @property
    def last_message(self) -> str:
        return self.jobs.last_message

    def _report(self, message: str, level: str = "status") -> None:
        self.jobs.report(message, level)


__all__ = ["JobDock", "JobRunner", "Refused", "refusing"]
