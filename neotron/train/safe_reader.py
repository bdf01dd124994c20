"""Reading DCP checkpoints without ever running code from them.

A DCP checkpoint can run code on load in two places, and both are closed here:

1. `.metadata` is a pickle, and `FileSystemReader.read_metadata` calls `pickle.load` on it.
   `_MetadataUnpickler` resolves globals through an exact allow-list of `(module, name)` pairs:
   the classes DCP metadata is made of, torch dtypes, `torch.Size` and a path class. A dotted
   name is refused before any lookup (pickle protocol 4 would otherwise resolve
   `("torch.distributed.checkpoint.filesystem", "os.system")` to `os.system`), and nothing is
   imported or looked up by name at load time: the allowed objects are resolved once, here.
2. Non-tensor entries are stored by DCP as pickled bytes, which its default planner reads with
   `torch.load(weights_only=False)`. `safe_load` asks DCP for tensors only: every requested key
   must be stored as a tensor (else the checkpoint is refused before any data is read), and
   `_TensorOnlyPlanner.load_bytes` refuses as a second line of defence. neotron keeps its own
   non-tensor state (optimizer hyper-parameters, trainer state) as JSON beside the checkpoint
   (checkpoint.py).

Tensor data itself is read by DCP with `torch.load(weights_only=True)`. Every refusal is a
`CheckpointError` (a UsageError: one line on the console, exit status 2).
"""

from __future__ import annotations

import collections
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_fs
import torch.distributed.checkpoint.metadata as dcp_md
import torch.serialization
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from neotron.errors import UsageError


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded safely or does not fit this run."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {}
    md_classes = ("Metadata", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                  "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                  "_MEM_FORMAT_ENCODING")
    for name in md_classes:
        if hasattr(dcp_md, name):
            allowed[(dcp_md.__name__, name)] = getattr(dcp_md, name)
    allowed[(dcp_fs.__name__, "_StorageInfo")] = dcp_fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    # layouts are pickled as a lookup of their name in a table of torch.layout objects
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    # StorageMeta.checkpoint_id is the path the checkpoint was written to; constructing a
    # path object touches no file. (Python 3.13 moved the classes to pathlib._local.)
    for module in ("pathlib", "pathlib._local"):
        for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            allowed[(module, name)] = getattr(pathlib, name)
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    return allowed


_ALLOWED = _allowed_globals()


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any global not in the exact allow-list is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name and (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(
            f"it refers to {module}:{name}, which is not a DCP metadata type")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent reference")


def read_metadata_file(path: Path) -> Metadata:
    """The `Metadata` of the `.metadata` file at `path`, or CheckpointError."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refusing to load this checkpoint: {e}") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata"
                              f" ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: does not hold DCP Metadata (found"
                              f" {type(metadata).__name__}); refusing to load this checkpoint")
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        # data files are plain names inside the checkpoint directory
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", ".."):
            raise CheckpointError(f"{path}: names data file {rel!r} outside the checkpoint"
                                  " directory; refusing to load this checkpoint")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata goes through the allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata_file(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner, minus the one path that unpickles: pickled (non-tensor) entries."""

    def load_bytes(self, read_item: ReadItem, value: Any) -> None:
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn} is pickled data;"
                              " refusing to load it")


def _flat_keys(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The keys DCP gives a nested dict of tensors ('a.b.c'), with their tensors."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_tensor_entries(ckpt: Path, metadata: Metadata, state: dict[str, Any]) -> None:
    """Every tensor `state` asks for is stored as a tensor of the same shape in `metadata`."""
    stored = metadata.state_dict_metadata
    for key, tensor in _flat_keys(state).items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"safe_load reads tensors only; {key} is a {type(tensor).__name__}")
        md = stored.get(key)
        if md is None:
            raise CheckpointError(f"{ckpt}: has no entry {key}: it was written by another"
                                  " model or optimizer config (start a new run_dir)")
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{ckpt}: entry {key} is stored as pickled data, not a"
                                  " tensor; refusing to load this checkpoint")
        if tuple(md.size) != tuple(tensor.shape):
            raise CheckpointError(
                f"{ckpt}: {key} has shape {tuple(md.size)} in the checkpoint but"
                f" {tuple(tensor.shape)} in this run's model: it was written by another model"
                " config (resume and eval need the run's own model; start a new run_dir)")


def refuse_pickled_entries(ckpt: Path, metadata: Metadata, format_: int) -> None:
    """neotron writes no pickled entries (format 3); a checkpoint that has some was crafted or
    altered, and is refused even where the entry would not be read. Format 1-2 checkpoints
    pickled the optimizer's param_groups: those are tolerated there, and never read."""
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            continue
        if format_ < 3 and key.startswith("optim.param_groups."):
            continue
        raise CheckpointError(f"{ckpt}: entry {key} is stored as pickled data, not a tensor;"
                              " refusing to load this checkpoint")


def safe_load(state: dict[str, Any], ckpt: Path, *, no_dist: bool = False,
              metadata: Metadata | None = None) -> None:
    """Load the tensors of the nested dict `state` in place from the DCP checkpoint `ckpt`.

    `state` must hold tensors only (plain or DTensor). Nothing in the checkpoint is unpickled
    except its metadata, through the allow-list."""
    reader = SafeFileSystemReader(ckpt)
    if metadata is None:
        metadata = reader.read_metadata()
    check_tensor_entries(ckpt, metadata, state)
    dcp.load(state, storage_reader=reader, planner=_TensorOnlyPlanner(), no_dist=no_dist)
