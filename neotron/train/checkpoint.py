"""Checkpoints: DCP directories written atomically, with JSON trainer state.

Layout of `run_dir/checkpoints/`:
    step_00000100/      .metadata, __<rank>_0.distcp (DCP: model, optimizer, RNG tensors)
                        meta.json (step, tokens, data position, world size, ...)
    latest              text file naming the newest complete checkpoint directory

A checkpoint is written into `.tmp-step_XXXXXXXX`, fsynced, renamed into place, and only then
is `latest` replaced (write + os.replace). A crash at any instant therefore leaves `latest`
naming a complete checkpoint; leftover `.tmp-*` directories are removed by the next save.
Nothing is unpickled on load except DCP metadata, through an allow-list (safe_reader.py).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from neotron.train import faults
from neotron.train.safe_reader import SafeFileSystemReader

STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "meta.json").is_file()


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class Checkpointer:
    def __init__(self, ckpt_dir: str | Path, keep_last: int, is_writer: bool = True) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.is_writer = is_writer  # rank 0: renames, `latest`, pruning

    # ------------------------------------------------------------ discovery

    def complete_steps(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.glob(f"{STEP_PREFIX}*") if p.is_dir() and _is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names; falls back to the newest complete one."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            candidate = self.dir / pointer.read_text().strip()
            if _is_complete(candidate):
                return candidate
        steps = self.complete_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------ save

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             meta: dict[str, Any]) -> Path:
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{step_dir_name(step)}"
        if self.is_writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # re-saving the same step (e.g. stop right after a save)
                return final
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "rng": _rng_state()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(state, checkpoint_id=tmp)
        faults.inject("checkpoint.after_tensors")
        if self.is_writer:
            full_meta = {"step": step, "format": 1, **meta}
            (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, sort_keys=True))
            _fsync_tree(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.dir)
            _write_atomic(self.dir / "latest", final.name + "\n")
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        steps = self.complete_steps()
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------ load

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             restore_rng: bool = True) -> dict[str, Any]:
        """Load model (and optimizer, RNG) state in place; returns meta.json's contents."""
        meta = json.loads((path / "meta.json").read_text())
        reader = SafeFileSystemReader(path)
        # Read the metadata once up front: a refused pickle then surfaces as a plain
        # UnpicklingError, not buried in DCP's per-rank exception report.
        reader.read_metadata()
        state: dict[str, Any] = {}
        if optimizer is not None:
            state["model"], state["optim"] = get_state_dict(model, optimizer)
        else:
            state["model"] = get_model_state_dict(model)
        if restore_rng:
            state["rng"] = {k: v.clone() for k, v in _rng_state().items()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, storage_reader=reader)
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        else:
            set_model_state_dict(model, state["model"])
        if restore_rng:
            torch.set_rng_state(state["rng"]["cpu"])
            if "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"])
        return meta


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
