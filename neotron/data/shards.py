"""Packed token shards: flat little-endian uint16/uint32 files, read back with np.memmap.

A split is one token stream (documents back to back, each followed by EOS) cut into files of at
most `shard_tokens` tokens. Documents may straddle files; `ShardSet.read` hides that.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in 16 bits, else uint32. Explicitly
    little-endian so shards are portable between machines."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return {2: "uint16", 4: "uint32"}[dtype.itemsize]


def dtype_from_name(name: str) -> np.dtype:
    return {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}[name]


@dataclass(frozen=True)
class ShardInfo:
    file: str  # name relative to the split directory
    tokens: int


class ShardWriter:
    """Appends token arrays to `<dir>/<prefix>_000000.bin`, `..._000001.bin`, ... and hashes
    the stream (independently of where it is cut into files)."""

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.dtype, self.shard_tokens = prefix, np.dtype(dtype), shard_tokens
        self.shards: list[ShardInfo] = []
        self.total = 0
        self._sha = hashlib.sha256()
        self._file = None
        self._in_file = 0

    def write(self, tokens: np.ndarray) -> None:
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        while len(data):
            if self._file is None:
                self._open_next()
            take = min(len(data), self.shard_tokens - self._in_file)
            chunk = data[:take].tobytes()
            self._file.write(chunk)
            self._sha.update(chunk)
            self._in_file += take
            self.total += take
            data = data[take:]
            if self._in_file == self.shard_tokens:
                self._close_current()

    def close(self) -> list[ShardInfo]:
        if self._file is not None:
            self._close_current()
        return self.shards

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def _open_next(self) -> None:
        name = f"{self.prefix}_{len(self.shards):06d}.bin"
        self._file = open(self.dir / name, "wb")  # noqa: SIM115 - closed in _close_current
        self._name, self._in_file = name, 0

    def _close_current(self) -> None:
        # fsync: the dataset is declared complete (index.json) only after its bytes are on disk.
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards.append(ShardInfo(self._name, self._in_file))
        self._file = None


class ShardSet:
    """The shards of one split, memory-mapped read-only, addressed as one token stream."""

    def __init__(
        self,
        directory: Path,
        shards: list[ShardInfo],
        dtype: np.dtype,
        *,
        fingerprint: str,
        vocab_size: int,
        eos_id: int,
    ):
        self.dir = Path(directory)
        self.shards = list(shards)
        self.dtype = np.dtype(dtype)
        self.fingerprint = fingerprint
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._maps = [
            np.memmap(self.dir / s.file, dtype=self.dtype, mode="r", shape=(s.tokens,))
            for s in self.shards
        ]
        # _starts[k] = stream offset of shard k's first token
        self._starts = [0]
        for s in self.shards:
            self._starts.append(self._starts[-1] + s.tokens)

    @property
    def total_tokens(self) -> int:
        return self._starts[-1]

    def __len__(self) -> int:
        return self.total_tokens

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the stream, across shard boundaries (a copy)."""
        if start < 0 or n < 0 or start + n > self.total_tokens:
            raise IndexError(f"window [{start}, {start + n}) outside 0..{self.total_tokens}")
        out = np.empty(n, dtype=self.dtype)
        k = bisect.bisect_right(self._starts, start) - 1
        done = 0
        while done < n:
            lo = start + done - self._starts[k]
            take = min(n - done, self.shards[k].tokens - lo)
            out[done : done + take] = self._maps[k][lo : lo + take]
            done += take
            k += 1
        return out

    def tokens(self) -> np.ndarray:
        """The whole stream as one array (a copy: for small splits and tests)."""
        return self.read(0, self.total_tokens)
