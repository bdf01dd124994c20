"""`log.profile`: a torch.profiler trace of steps [start, start + steps), and on CUDA a memory
snapshot of the same window plus one on out-of-memory.

The trace is Chrome trace JSON (open it in chrome://tracing or https://ui.perfetto.dev), one
file per rank: `<dir>/trace_rank<r>_steps<a>-<b>.json`. Every profiled step is wrapped in a
`record_function("neotron_step_<n>")` range, n being the step number metrics.jsonl uses.

CUDA only (not run on the CPU build machines): allocator history is recorded during the window
(`torch.cuda.memory._record_memory_history`, a private but documented API, see
https://pytorch.org/docs/stable/torch_cuda_memory.html) and dumped to
`memory_rank<r>_steps<a>-<b>.pickle` at its end (view it at https://pytorch.org/memory_viz);
an out-of-memory error in any step dumps `memory_rank<r>_oom_step<n>.pickle` before it is
re-raised.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from neotron.config import ProfileConfig


class StepProfiler:
    """Wraps each training step; does nothing when `cfg` is None."""

    def __init__(self, cfg: ProfileConfig | None, run_dir: Path, device: torch.device,
                 rank: int) -> None:
        self.cfg = cfg
        self.rank = rank
        self.cuda_memory = cfg is not None and cfg.memory and device.type == "cuda"
        self.dir = None if cfg is None else Path(cfg.dir) if cfg.dir else run_dir / "profile"
        self._prof: torch.profiler.profile | None = None
        self.written: list[Path] = []

    def _window(self) -> tuple[int, int]:
        assert self.cfg is not None
        return self.cfg.start, self.cfg.start + self.cfg.steps - 1

    @contextmanager
    def step(self, n: int) -> Iterator[None]:
        """Context for training step n (1-based)."""
        if self.cfg is None:
            yield
            return
        first, last = self._window()
        inside = first <= n <= last
        if inside and self._prof is None:
            self._start()
        try:
            with torch.profiler.record_function(f"neotron_step_{n}") if inside else nullcontext():
                yield
        except torch.cuda.OutOfMemoryError:
            if self.cuda_memory:
                self._dump_memory(f"oom_step{n}")
            raise
        if n == last and self._prof is not None:
            self._stop()

    def _start(self) -> None:
        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.cuda_memory:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True,
                                            profile_memory=True, with_stack=False)
        self._prof.__enter__()

    def _stop(self) -> None:
        assert self._prof is not None and self.dir is not None
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        first, last = self._window()
        path = self.dir / f"trace_rank{self.rank}_steps{first}-{last}.json"
        prof.export_chrome_trace(str(path))
        self.written.append(path)
        if self.cuda_memory:
            self._dump_memory(f"steps{first}-{last}")
            torch.cuda.memory._record_memory_history(enabled=None)

    def _dump_memory(self, what: str) -> None:
        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"memory_rank{self.rank}_{what}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        self.written.append(path)

    def close(self) -> None:
        """End of run (or a stop inside the window): write what was recorded so far."""
        if self._prof is not None:
            self._stop()
