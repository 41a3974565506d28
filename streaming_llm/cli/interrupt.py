"""Ctrl-C that stops generation between tokens, never in the middle of a forward pass."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class StopRequest:
    """Set by Ctrl-C while active; generation loops check it between tokens."""

    def __init__(self):
        self.event = threading.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    @contextmanager
    def catching(self):
        """Within this block the first Ctrl-C only asks to stop; a second one interrupts for real."""
        self.event.clear()
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.event.is_set():
                raise KeyboardInterrupt
            self.event.set()

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
