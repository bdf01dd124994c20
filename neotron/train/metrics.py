"""Run observability: metrics.jsonl, TensorBoard scalars and a console progress line.

Only the writer rank (rank 0) writes files. On resume from step S, records after S left by the
interrupted run are dropped from metrics.jsonl and TensorBoard is opened with purge_step=S+1,
so the logs of a resumed run read like those of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, from the vendors' sheets.
_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "B200": 2250e12,
    "MI300X": 1307e12,
}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    """Per-device peak FLOP/s used for MFU; None when unknown (MFU is then not reported)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


def _trim_jsonl(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
    path.write_text("".join(k + "\n" for k in kept))


class MetricsLogger:
    def __init__(self, run_dir: Path, *, is_writer: bool, tensorboard: bool,
                 resume_step: int | None, total_steps: int) -> None:
        self.is_writer = is_writer
        self.total_steps = total_steps
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self._start = time.time()
        self._start_step = resume_step or 0
        if not is_writer:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        _trim_jsonl(self.path, resume_step if resume_step is not None else -1)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses <= 1 line
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(run_dir / "tb"),
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_writer:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key.replace("val_", "val/"), value, step)

    def console(self, record: dict[str, Any]) -> None:
        if not self.is_writer:
            return
        step = record["step"]
        parts = [f"step {step:>6}/{self.total_steps}"]
        if "loss" in record:
            loss = record["loss"]
            parts.append(f"loss {loss:.4f}" if loss is not None else "loss non-finite (skipped)")
        if "val_loss" in record:
            parts.append(f"val_loss {record['val_loss']:.4f} ppl {record['val_ppl']:.1f}")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.2e}")
        if record.get("grad_norm") is not None:
            parts.append(f"gnorm {record['grad_norm']:.3f}")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if record.get("mfu") is not None:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        done = step - self._start_step
        if done > 0 and "loss" in record:
            eta = (time.time() - self._start) / done * (self.total_steps - step)
            parts.append(f"eta {int(eta) // 60}m{int(eta) % 60:02d}s")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def info(self, message: str) -> None:
        if self.is_writer:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.is_writer:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
