"""Graceful stop on SIGTERM/SIGINT, and fault injection for the crash-safety tests.

Fault injection is off unless one of these environment variables is set (each is read once):

- `NEOTRON_FAULT_INJECT=<point>:<seconds>` makes the process sleep at the named point, so a
  test can SIGKILL it at a known instant; `<point>:enospc` raises the OSError of a full disk
  there instead. Points: `checkpoint.after_tensors` (a checkpoint's
  tensors are written, it is not yet renamed into place), `checkpoint.write` (inside the DCP
  write, in the background thread when `checkpoint.async` is on).
- `NEOTRON_FAULT_KILL=<step>[@<rank>]`: the process (every rank, or only `rank`) SIGKILLs itself
  just before training step `step`, in the first attempt of a torchrun job only
  (TORCHELASTIC_RESTART_COUNT unset or 0), so that `torchrun --max-restarts` can be seen
  restarting the job, which then resumes from its latest checkpoint.
- `NEOTRON_FAULT_NAN=<step>[,<step>...][@<rank>]`: the loss of those steps (on every rank, or
  only on `rank`) is multiplied by NaN, to exercise `train.nan_policy`.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from types import FrameType


def inject(point: str) -> None:
    spec = os.environ.get("NEOTRON_FAULT_INJECT")
    if not spec:
        return
    name, _, action = spec.partition(":")
    if name != point:
        return
    if action == "enospc":  # a full disk, as the write would see it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), point)
    time.sleep(float(action or 3600))


def _steps_for_rank(var: str, rank: int) -> set[int]:
    spec = os.environ.get(var, "").strip()
    if not spec:
        return set()
    steps, _, who = spec.partition("@")
    if who and int(who) != rank:
        return set()
    return {int(s) for s in steps.split(",") if s.strip()}


class FaultPlan:
    """The injected faults of this process (empty in normal runs)."""

    def __init__(self, rank: int) -> None:
        first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0
        self.kill_steps = _steps_for_rank("NEOTRON_FAULT_KILL", rank) if first_attempt else set()
        self.nan_steps = _steps_for_rank("NEOTRON_FAULT_NAN", rank)

    def before_step(self, step: int) -> None:
        if step in self.kill_steps:
            os.kill(os.getpid(), signal.SIGKILL)

    def nan_at(self, step: int) -> bool:
        return step in self.nan_steps


class StopFlag:
    """Set by SIGTERM/SIGINT: the trainer finishes the current step, saves and exits 0.

    In a distributed run every rank's flag goes into the per-step all-reduce, so all ranks stop
    at the same step even when the signal reached only some of them (or reached them during
    different steps).

    A second SIGINT restores the default handler's behaviour (KeyboardInterrupt), so an
    impatient Ctrl-C twice still stops at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back the handlers `install` replaced (a Trainer run inside another program)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
