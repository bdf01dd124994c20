"""Checkpoints: DCP directories written atomically, with JSON trainer state.

Layout of `run_dir/checkpoints/`:
    step_00000100/      .metadata, __<rank>_0.distcp (DCP: model, optimizer, RNG tensors)
                        meta.json (step, tokens, data position, world size, ...)
    latest              text file naming the newest complete checkpoint directory

A checkpoint is written into `.tmp-step_XXXXXXXX` by every rank (DCP: each rank writes its own
shards, rank 0 the metadata), fsynced, renamed into place by rank 0, and only then is `latest`
replaced (write + os.replace). A crash at any instant therefore leaves `latest` naming a
complete checkpoint; leftover `.tmp-*` directories are removed by the next save.

Loading never runs code from the checkpoint (safe_reader.py): DCP holds tensors only, its
`.metadata` is unpickled through an exact allow-list, and everything that is not a tensor (the
optimizer's hyper-parameters, any non-tensor optimizer state) is kept as JSON in `state.json`
(format 3). Format 1-2 checkpoints kept that part as pickles inside DCP; it is not read, and
this run's values (from its config) stand in. Every problem (refused pickle, missing or
mis-shaped tensor, unreadable JSON, a `latest` naming no complete checkpoint) is a
CheckpointError: one line, exit status 2.

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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from neotron.train import faults, plain_state
from neotron.train.safe_reader import (
    CheckpointError,
    read_metadata_file,
    refuse_pickled_entries,
    safe_load,
)

STEP_PREFIX = "step_"
# 1: single-process RNG under rng.cpu; 2: per-rank RNG under rng.rank<r>;
# 3: non-tensor state in state.json, DCP holds tensors only
FORMAT = 3
PLAIN_STATE = "state.json"


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
        self._pending: tuple[Future, Path, Path, dict[str, Any], str] | None = None
        self.rng_restored: bool | None = None  # set by load(): None = not asked

    # ------------------------------------------------------------ discovery

    def complete_steps(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.glob(f"{STEP_PREFIX}*") if p.is_dir() and _is_complete(p)]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names; without `latest`, the newest complete one.

        `latest` is replaced only after the checkpoint it names is complete, so a `latest`
        naming a missing or incomplete directory means the run directory was tampered with
        (a checkpoint deleted or moved): that is refused rather than silently resuming from
        an older step."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            name = pointer.read_text().strip()
            candidate = self.dir / name
            if (not name.startswith(STEP_PREFIX) or "/" in name
                    or not _is_complete(candidate)):
                steps = self.complete_steps()
                hint = (f"; remove {pointer} to use the newest complete one, {steps[-1].name}"
                        if steps else "; no complete checkpoint is left")
                raise CheckpointError(f"{pointer} names {name!r}, which is not a complete"
                                      f" checkpoint in {self.dir}{hint}")
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
        tensors, plain = plain_state.split(state)  # DCP gets tensors only: nothing to unpickle
        full_meta = {"step": step, "format": FORMAT, "world_size": world, **meta}
        plain_json = plain_state.to_json(plain)
        writer = _SlowableWriter(tmp)
        try:
            with _quiet():
                if self.async_save:
                    future = dcp.async_save(tensors, storage_writer=writer,
                                            process_group=self.process_group)
                    self._pending = (future, tmp, final, full_meta, plain_json)
                    return final
                dcp.save(tensors, storage_writer=writer)
            self._finalize(tmp, final, full_meta, plain_json)
        except (Exception, CheckpointException) as e:
            self._abandon(tmp, final, e)
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
        future, tmp, final, meta, plain_json = self._pending
        self._pending = None
        try:
            future.result()  # re-raises a failed write
            self._finalize(tmp, final, meta, plain_json)
        except (Exception, CheckpointException) as e:
            self._abandon(tmp, final, e)
        return final

    def _abandon(self, tmp: Path, final: Path, error: BaseException) -> None:
        """A save failed (a full disk, a lost mount): drop its partial directory and stop the
        run with one line. `latest` still names the previous, complete checkpoint."""
        if self.is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = self.dir / "latest"
        kept = (f"{previous.read_text().strip()} is intact" if previous.is_file()
                else "no earlier checkpoint exists")
        raise CheckpointError(
            f"could not write checkpoint {final.name} in {self.dir} ({_describe(error)}); {kept}"
            " and a resume continues from it") from None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def _finalize(self, tmp: Path, final: Path, meta: dict[str, Any], plain_json: str) -> None:
        """Make a fully written temp directory the newest checkpoint (rank 0). DCP's rank 0
        writes .metadata only after every rank reported its shards written, so when its write
        has returned, the whole checkpoint is on disk."""
        faults.inject("checkpoint.after_tensors")
        if not self.is_writer:
            return
        (tmp / PLAIN_STATE).write_text(plain_json)
        # meta.json last: its presence is what marks the directory complete
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
        restored (they are not when the checkpoint's world size differs from this run's).

        Everything is checked before anything is changed: the metadata's pickle (allow-list),
        that every tensor this model and optimizer need is stored as a tensor of the same
        shape, and the JSON files. A CheckpointError leaves the model untouched."""
        meta = read_meta(path)
        metadata = read_metadata_file(path / ".metadata")
        refuse_pickled_entries(path, metadata, int(meta.get("format", 1)))
        state: dict[str, Any] = {}
        if optimizer is not None:
            state["model"], state["optim"] = get_state_dict(model, optimizer)
        else:
            state["model"] = get_model_state_dict(model)
        tensors, plain = plain_state.split(state)
        saved_plain = self._read_plain(path, meta) if optimizer is not None else {}
        rank, world = _dist_rank_world()
        self.rng_restored = None
        nest = f"rank{rank}"
        if restore_rng:
            # format 1 (one process) kept its RNG under rng.cpu; later ones under rng.rank<r>.
            legacy = int(meta.get("format", 1)) < 2
            self.rng_restored = world == 1 if legacy else int(meta.get("world_size", 1)) == world
        if self.rng_restored:
            prefix = "rng." if legacy else f"rng.{nest}."
            saved = {k[len(prefix):] for k in metadata.state_dict_metadata if k.startswith(prefix)}
            mine = {k: v.clone() for k, v in _rng_state().items() if k in saved}
            tensors["rng"] = mine if legacy else {nest: mine}
        with _quiet():
            safe_load(tensors, path, metadata=metadata)
        plain_state.restore(state, saved_plain, plain)
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        else:
            set_model_state_dict(model, state["model"])
        if self.rng_restored:
            rng = tensors["rng"] if legacy else tensors["rng"][nest]
            if "cpu" in rng:
                torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return meta

    @staticmethod
    def _read_plain(path: Path, meta: dict[str, Any]) -> dict:
        """The saved non-tensor state (format 3); older formats pickled it inside DCP, where
        it is not read: the live optimizer's values (from this run's config) stand."""
        if int(meta.get("format", 1)) < 3:
            return {}
        file = path / PLAIN_STATE
        try:
            return plain_state.from_json(file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file}: unreadable ({e})") from None


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json, or CheckpointError naming it."""
    file = path / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{file}: not a neotron checkpoint record (no integer 'step')")
    return meta


def _describe(error: BaseException) -> str:
    """One line for a failed save: the first rank's root cause, not DCP's multi-rank report."""
    if isinstance(error, CheckpointException) and error.failures:
        first = next(iter(error.failures.values()))
        return _describe(first[0] if isinstance(first, tuple) else first)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
