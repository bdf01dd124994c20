"""Graceful stop on SIGTERM/SIGINT, and fault injection for the crash-safety tests.

Fault injection: `NEOTRON_FAULT_INJECT=<point>:<seconds>` makes the process sleep at the
named point, so a test can SIGKILL it at a known instant (e.g. halfway through writing a
checkpoint). Unset in normal runs; the check is one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType


def inject(point: str) -> None:
    spec = os.environ.get("NEOTRON_FAULT_INJECT")
    if not spec:
        return
    name, _, seconds = spec.partition(":")
    if name == point:
        time.sleep(float(seconds or 3600))


class StopFlag:
    """Set by SIGTERM/SIGINT: the trainer finishes the current step, saves and exits 0.

    A second SIGINT restores the default handler's behaviour (KeyboardInterrupt), so an
    impatient Ctrl-C twice still stops at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> StopFlag:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
