"""Run observability: metrics.jsonl, TensorBoard scalars and a console progress line.

Only the writer rank (rank 0) writes files. On resume from step S, records after S left by the
interrupted run are dropped from metrics.jsonl and TensorBoard is opened with purge_step=S+1,
so the logs of a resumed run read like those of an uninterrupted one.

TensorBoard also gets the resolved config as text (tag `config`) and as hparams (the flattened
config keys, with `loss`, `val/loss` and `val/ppl` as the metrics: the HParams tab shows their
last values). With `log.wandb`, every metrics.jsonl record's numeric values go to Weights &
Biases under the same names and step (docs/logging.md).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from neotron.config import RunConfig, WandbConfig, to_yaml
from neotron.errors import ConfigError

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


# Scalars the HParams tab shows beside the config (tags as add_scalar writes them below).
HPARAM_METRICS = ("loss", "val/loss", "val/ppl")


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`a.b.c -> value` for a nested config; booleans as "true"/"false" (torch's writer would
    store them as 1/0) and values the plugin cannot hold (lists, None) as their JSON text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_hparams(value, name + "."))
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def _numeric(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
            and math.isfinite(v)}


class MetricsLogger:
    def __init__(self, run_dir: Path, *, is_writer: bool, tensorboard: bool,
                 resume_step: int | None, total_steps: int,
                 run_config: RunConfig | None = None) -> None:
        self.is_writer = is_writer
        self.total_steps = total_steps
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        self._start = time.time()
        self._start_step = resume_step or 0
        wandb_cfg = run_config.log.wandb if run_config is not None else None
        if wandb_cfg is not None:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:  # checked on every rank
                raise ConfigError("log.wandb is set but wandb is not installed"
                                  " (pip install 'neotron[wandb]'), or remove log.wandb")
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
            if run_config is not None:
                self._log_config(run_config, resume_step or 0)
        if wandb_cfg is not None:
            assert run_config is not None
            self._wandb = _init_wandb(wandb_cfg, run_config, run_dir)

    def _log_config(self, cfg: RunConfig, step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        text = to_yaml(cfg)
        # Markdown: indent four spaces so TensorBoard shows the YAML as a code block.
        self._tb.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), step)
        for summary in hparams(flat_hparams(yaml.safe_load(text)),
                               dict.fromkeys(HPARAM_METRICS, 0.0)):
            self._tb.file_writer.add_summary(summary, step)

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_writer:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in _numeric(record).items():
                self._tb.add_scalar(key.replace("val_", "val/"), value, record["step"])
        if self._wandb is not None:
            self._wandb.log(_numeric(record), step=record["step"])

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
            if self._wandb is not None:
                self._wandb.finish()
                self._wandb = None


def _init_wandb(wb: WandbConfig, cfg: RunConfig, run_dir: Path) -> Any:
    import wandb  # optional dependency: imported only when log.wandb is set

    out = Path(wb.dir) if wb.dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=wb.project, entity=wb.entity, name=wb.name, group=wb.group,
                      tags=wb.tags or None, mode=wb.mode, dir=str(out), id=wb.id,
                      resume="allow" if wb.id else None,
                      config=yaml.safe_load(to_yaml(cfg)))
