"""Cooperative stop on Ctrl-C: a process-wide flag that long loops check between batches.

`stop_on_sigint()` installs a SIGINT handler (main thread only) that sets the flag and
raises `KeyboardInterrupt` in the main thread, as Python's default does; worker threads
(Prefect's thread task runner) cannot be interrupted from outside, so loops call
`check_stop()` between batches and leave with `Interrupted` within one batch. The files a
batch writes are atomic (`quasid.core.io`), so a stop leaves no half-written file.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP = threading.Event()


class Interrupted(KeyboardInterrupt):
    """A loop stopped because a stop was requested (SIGINT)."""


def request_stop() -> None:
    """Ask every loop that checks the flag to stop at its next check."""
    STOP.set()


def check_stop() -> None:
    """Raise `Interrupted` when a stop was requested."""
    if STOP.is_set():
        raise Interrupted("stopped on request (SIGINT)")


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[None]:
    """Within the block, SIGINT sets the stop flag and interrupts the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        request_stop()
        raise KeyboardInterrupt

    STOP.clear()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
