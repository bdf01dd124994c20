"""Progress of the long data steps (hashing, splitting, tokenizer training, tokenizing).

On a terminal it is a tqdm bar. Anywhere else (Slurm logs, nohup, CI) a bar is useless: tqdm
redraws one line with carriage returns, and the log shows nothing until the end. There,
`Progress` logs a line through `logging` (the CLI sends it to stdout) every `interval` seconds
from a background thread, with the count, the rate and the ETA, so that a step stuck inside
one long batch still shows that it is alive:

    data: tokenize 41,472/120,000 doc (34.6%), 52.10 M tok, 3,310 doc/s, 4.16 M tok/s, ETA 0:00:23

The interval is 5 s, or `NEOTRON_PROGRESS_INTERVAL` (seconds) from the environment.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from types import TracebackType

from tqdm import tqdm

from neotron.errors import UsageError

log = logging.getLogger("neotron.data")

INTERVAL_ENV = "NEOTRON_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 5.0


def bars_enabled(progress: bool | None) -> bool:
    """`progress` as the data functions take it: True/False, or None for "on a terminal"."""
    return sys.stderr.isatty() if progress is None else progress


def log_interval() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{INTERVAL_ENV} must be a positive number of seconds, got '{raw}'")
    return value


def _count(n: float) -> str:
    """1,234 / 12.5 / 3.21 M: exact below 100,000, three significant figures above."""
    for scale, suffix in ((1e9, "G"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    if n >= 1e5:
        return f"{n / 1e3:.0f} k"
    return f"{n:,.0f}" if n >= 100 or n == int(n) else f"{n:.1f}"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Counts units of work (and optionally tokens) toward `total`; shows a bar or log lines.

    Use as a context manager; call `update(n, tokens=...)` as work completes.
    """

    def __init__(
        self,
        desc: str,
        total: int | None,
        unit: str,
        *,
        progress: bool | None = None,
        bar: bool = True,
        interval: float | None = None,
    ):
        """`progress`: True/False, None = a bar only on a terminal, log lines elsewhere.
        `bar=False`: the caller's library draws its own bar on a terminal; only log lines."""
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0
        self.tokens = 0
        self.lines = 0  # log lines written
        self._start = time.monotonic()
        self._bar = None
        self._thread = None
        self._stop = threading.Event()
        if bars_enabled(progress):
            if bar:
                self._bar = tqdm(total=total, unit=unit, desc=desc, unit_scale=unit == "B")
        else:
            self._interval = log_interval() if interval is None else interval
            self._thread = threading.Thread(target=self._heartbeat, daemon=True)
            self._thread.start()

    def update(self, n: int = 1, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(n)

    def line(self) -> str:
        """The progress line as it stands now."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        done, tokens, total = self.done, self.tokens, self.total
        parts = [f"{self.desc} {_count(done)}"]
        if total:
            parts[0] += f"/{_count(total)} {self.unit} ({100 * done / total:.1f}%)"
        else:
            parts[0] += f" {self.unit}"
        if tokens:
            parts.append(f"{_count(tokens)} tok")
        parts.append(f"{_count(done / elapsed)} {self.unit}/s")
        if tokens:
            parts.append(f"{_count(tokens / elapsed)} tok/s")
        if total and done >= total:
            parts.append(f"all read after {_clock(elapsed)}, finishing")
        elif total and done:
            parts.append(f"ETA {_clock((total - done) * elapsed / done)}")
        else:
            parts.append(f"{_clock(elapsed)} elapsed")
        return ", ".join(parts)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self._interval):
            log.info("%s", self.line())
            self.lines += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self.lines:  # the step was long enough to report on: say that it ended
                elapsed = time.monotonic() - self._start
                tokens = f", {_count(self.tokens)} tok" if self.tokens else ""
                log.info(
                    "%s done: %s %s%s in %s",
                    self.desc,
                    _count(self.done),
                    self.unit,
                    tokens,
                    _clock(elapsed),
                )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
