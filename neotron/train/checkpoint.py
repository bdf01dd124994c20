"""Checkpoints: DCP directories written atomically, with JSON trainer state.

Layout of `run_dir/checkpoints/`:
    step_00000100/      .metadata, __<rank>_0.distcp (DCP: model, optimizer, RNG tensors)
                        meta.json (step, tokens, data position, world size, ...)
    latest              text file naming the newest complete checkpoint directory

A checkpoint is written into `.tmp-step_XXXXXXXX` by every rank (DCP: each rank writes its own
shards, rank 0 the metadata), fsynced, renamed into place by rank 0, and only then is `latest`
replaced (write + os.replace). A crash at any instant therefore leaves `latest` naming a
complete checkpoint; leftover `.tmp-*` directories are removed by the next save. Nothing is
unpickled on load except DCP metadata, through an allow-list (safe_reader.py).

Resharding: model and optimizer state are saved through `get_state_dict`, which gives DTensor
shards under FSDP2 / tensor parallelism and plain tensors otherwise; DCP stores global tensors,
so a checkpoint written by N ranks loads on any M ranks and any parallel layout (or in one
process with no process group at all). RNG states are per rank (`rng.rank<r>`): they are
restored when the world size matches and skipped otherwise (the caller logs a warning).

Asynchronous save (`checkpoint.async: true`): `dcp.async_save` copies the state to host memory
(the only part the training step waits for) and writes it from a background thread over a
dedicated gloo group. The checkpoint is finalized (meta.json, fsync, rename, `latest`) by rank 0
once the write has completed, at a later step boundary (`poll`) or at the latest before the
next save or the end of the run (`wait`): atomicity is the same as for a synchronous save.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from neotron.train import faults
from neotron.train.safe_reader import SafeFileSystemReader

STEP_PREFIX = "step_"
FORMAT = 2  # 1: single-process RNG under rng.cpu; 2: per-rank RNG under rng.rank<r>


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


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _SlowableWriter(FileSystemWriter):
    """FileSystemWriter with a fault-injection point in the (possibly background) write."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        faults.inject("checkpoint.write")
        return super().write_data(plan, planner)


@contextmanager
def _quiet():
    """DCP warns when used without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*torch.distributed is not initialized.*")
        yield


class Checkpointer:
    def __init__(self, ckpt_dir: str | Path, keep_last: int, is_writer: bool = True, *,
                 async_save: bool = False, process_group: Any = None) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.is_writer = is_writer  # rank 0: renames, `latest`, pruning
        self.async_save = async_save
        self.process_group = process_group  # for async writes (a gloo group of all ranks)
        self._pending: tuple[Future, Path, Path, dict[str, Any]] | None = None
        self.rng_restored: bool | None = None  # set by load(): None = not asked

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
        """Write a checkpoint of `step` (every rank calls this). Synchronous: returns once it
        is complete and `latest` names it. Asynchronous: returns once the state is staged in
        host memory; the checkpoint becomes complete later (`poll` / `wait`)."""
        self.wait()  # one write in flight at most (and its collectives stay ordered)
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{step_dir_name(step)}"
        if self.is_writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        if final.exists():  # re-saving the same step (e.g. stop right after a save)
            return final
        rank, world = _dist_rank_world()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "rng": {f"rank{rank}": _rng_state()}}
        full_meta = {"step": step, "format": FORMAT, "world_size": world, **meta}
        writer = _SlowableWriter(tmp)
        with _quiet():
            if self.async_save:
                future = dcp.async_save(state, storage_writer=writer,
                                        process_group=self.process_group)
                self._pending = (future, tmp, final, full_meta)
                return final
            dcp.save(state, storage_writer=writer)
        self._finalize(tmp, final, full_meta)
        _barrier()
        return final

    def poll(self) -> Path | None:
        """Finalize a background save whose write has completed; never blocks. Returns the
        checkpoint it completed, if any."""
        if self._pending is not None and self._pending[0].done():
            return self.wait()
        return None

    def wait(self) -> Path | None:
        """Block until a background save (if any) is written, then finalize it."""
        if self._pending is None:
            return None
        future, tmp, final, meta = self._pending
        self._pending = None
        future.result()  # re-raises a failed write
        self._finalize(tmp, final, meta)
        return final

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def _finalize(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        """Make a fully written temp directory the newest checkpoint (rank 0). DCP's rank 0
        writes .metadata only after every rank reported its shards written, so when its write
        has returned, the whole checkpoint is on disk."""
        faults.inject("checkpoint.after_tensors")
        if not self.is_writer:
            return
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        _fsync_tree(tmp)
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        _write_atomic(self.dir / "latest", final.name + "\n")
        self._prune()

    def _prune(self) -> None:
        steps = self.complete_steps()
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------ load

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             restore_rng: bool = True) -> dict[str, Any]:
        """Load model (and optimizer, RNG) state in place, resharded to this run's layout;
        returns meta.json's contents. `self.rng_restored` tells whether the RNG states were
        restored (they are not when the checkpoint's world size differs from this run's)."""
        meta = json.loads((path / "meta.json").read_text())
        reader = SafeFileSystemReader(path)
        # Read the metadata once up front: a refused pickle then surfaces as a plain
        # UnpicklingError, not buried in DCP's per-rank exception report.
        metadata = reader.read_metadata()
        state: dict[str, Any] = {}
        if optimizer is not None:
            state["model"], state["optim"] = get_state_dict(model, optimizer)
        else:
            state["model"] = get_model_state_dict(model)
        rank, world = _dist_rank_world()
        self.rng_restored = None
        nest = f"rank{rank}"
        if restore_rng:
            # format 1 (one process) kept its RNG under rng.cpu; format 2 under rng.rank<r>.
            legacy = int(meta.get("format", 1)) < 2
            self.rng_restored = world == 1 if legacy else int(meta.get("world_size", 1)) == world
        if self.rng_restored:
            prefix = "rng." if legacy else f"rng.{nest}."
            saved = {k[len(prefix):] for k in metadata.state_dict_metadata if k.startswith(prefix)}
            mine = {k: v.clone() for k, v in _rng_state().items() if k in saved}
            state["rng"] = mine if legacy else {nest: mine}
        with _quiet():
            dcp.load(state, storage_reader=reader)
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        else:
            set_model_state_dict(model, state["model"])
        if self.rng_restored:
            rng = state["rng"] if legacy else state["rng"][nest]
            if "cpu" in rng:
                torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return meta


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
