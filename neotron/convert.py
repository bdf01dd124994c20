"""`neotron convert RUN_DIR_or_CHECKPOINT OUT`: a checkpoint as one consolidated safetensors file.

A neotron checkpoint is a DCP directory written by however many ranks trained the run, with
model, optimizer, RNG and trainer state. For use outside neotron, `convert` writes:

    OUT/model.safetensors   the model's full (unsharded) tensors, named as in the model's
                            state_dict (e.g. `layers.0.mixer.wq.weight`), plus metadata
                            (step, tokens, source checkpoint)
    OUT/config.yaml         the run's resolved config (model shape, tokenizer, ...)
    OUT/neotron.json        step, tokens, source checkpoint, parameter count, dtype

It reads the tensors straight from the DCP files in one process (no process group, no model
code), so it works for any architecture and any saved layout (FSDP2 shards, tensor-parallel
shards, one process). Nothing is unpickled but DCP metadata, through the allow-list reader
(train/safe_reader.py).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from neotron.errors import UsageError
from neotron.train.checkpoint import Checkpointer, read_meta
from neotron.train.safe_reader import read_metadata_file, refuse_pickled_entries, safe_load

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def find_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint dir, run dir or None) for a run directory, its checkpoints/ folder, or one
    checkpoint directory."""
    path = Path(path)
    if (path / ".metadata").is_file() and (path / "meta.json").is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return path, run_dir
    for ckpt_dir, run_dir in ((path / "checkpoints", path), (path, path.parent)):
        latest = Checkpointer(ckpt_dir, keep_last=1, is_writer=False).latest()
        if latest is not None:
            return latest, run_dir
    raise UsageError(f"no complete checkpoint found at {path} (expected a run directory or a"
                     " checkpoint directory holding .metadata and meta.json)")


def load_model_tensors(ckpt: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full model tensors of a DCP checkpoint, read in this process. Nothing is unpickled
    but the metadata, through the allow-list; a checkpoint with pickled entries is refused
    (CheckpointError)."""
    metadata = read_metadata_file(ckpt / ".metadata")
    refuse_pickled_entries(ckpt, metadata, int(read_meta(ckpt).get("format", 1)))
    state: dict[str, Any] = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata):
            state[key] = torch.empty(md.size, dtype=md.properties.dtype)
    if not state:
        raise UsageError(f"{ckpt} holds no model tensors")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*torch.distributed is not initialized.*")
        safe_load(state, ckpt, no_dist=True, metadata=metadata)
    out = {}
    for key, t in state.items():
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key.removeprefix("model.")] = t.contiguous()
    return out


def convert(source: str | Path, out: str | Path, dtype: str | None = None,
            force: bool = False) -> dict[str, Any]:
    from safetensors.torch import save_file

    ckpt, run_dir = find_checkpoint(source)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty (--force overwrites)")
    meta = read_meta(ckpt)
    tensors = load_model_tensors(ckpt, DTYPES[dtype] if dtype else None)
    out.mkdir(parents=True, exist_ok=True)  # only once the checkpoint has loaded
    info = {
        "source": str(ckpt.resolve()),
        "step": meta.get("step"),
        "tokens": meta.get("tokens"),
        "saved_world_size": meta.get("world_size", 1),
        "params": sum(t.numel() for t in tensors.values()),
        "tensors": len(tensors),
        "dtype": dtype or "as saved",
    }
    save_file(tensors, str(out / "model.safetensors"),
              metadata={k: str(v) for k, v in info.items()} | {"format": "neotron"})
    config = run_dir / "config.yaml" if run_dir is not None else None
    if config is not None and config.is_file():
        shutil.copyfile(config, out / "config.yaml")
        info["config"] = str(out / "config.yaml")
    else:
        info["config"] = None  # a bare checkpoint directory: no run config next to it
    (out / "neotron.json").write_text(json.dumps(info, indent=2) + "\n")
    info["out"] = str(out / "model.safetensors")
    return info
