"""Batches of token windows from one seeded global order; a data-parallel rank takes its slice.

The train stream of T tokens is cut into N = (T - 1) // seq_len windows; window i is tokens
[i*seq_len, i*seq_len + seq_len + 1) (inputs plus the next token as target, so neighbouring
windows share one token). Epoch e visits the windows in the order of a permutation drawn from a
torch.Generator seeded by (seed, e). Global sample s is window perm_{s // N}[s % N].

The loader's whole state is `consumed`, the number of global samples handed out. A global batch
of B samples is samples [consumed, consumed + B); rank r of W takes rows [r*B/W, (r+1)*B/W).
Because the order does not depend on W, a run can stop on 8 GPUs and resume on 2 without
repeating or skipping a sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from neotron.data.errors import DataError
from neotron.data.shards import ShardSet


def _check_dp(dp_rank: int, dp_world: int) -> None:
    if dp_world < 1 or not 0 <= dp_rank < dp_world:
        raise ValueError(f"data-parallel rank {dp_rank} is not in [0, {dp_world})")


def _rank_rows(global_batch_size: int, dp_rank: int, dp_world: int) -> tuple[int, int]:
    if global_batch_size <= 0 or global_batch_size % dp_world:
        raise ValueError(
            f"global batch size {global_batch_size} is not a positive multiple of the"
            f" data-parallel world size {dp_world}"
        )
    per_rank = global_batch_size // dp_world
    return dp_rank * per_rank, (dp_rank + 1) * per_rank


def _windows(shards: ShardSet, starts: np.ndarray, length: int) -> torch.Tensor:
    out = np.empty((len(starts), length), dtype=np.int64)
    for row, start in enumerate(starts):
        out[row] = shards.read(int(start), length)
    return torch.from_numpy(out)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for (seed, epoch): hashed, so epochs are unrelated streams."""
    digest = hashlib.sha256(f"neotron-data:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class TokenLoader:
    """Training batches [global_batch_size // dp_world, seq_len + 1] of int64 token ids."""

    def __init__(
        self, shards: ShardSet, seq_len: int, seed: int, dp_rank: int = 0, dp_world: int = 1
    ):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        _check_dp(dp_rank, dp_world)
        self.shards = shards
        self.seq_len = seq_len
        self.seed = int(seed)
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.fingerprint = shards.fingerprint
        self.num_samples = (shards.total_tokens - 1) // seq_len
        if self.num_samples < 1:
            raise DataError(
                f"the train split in {shards.dir} has {shards.total_tokens} tokens, too few for"
                f" one window of data.seq_len={seq_len} (+1) tokens; lower data.seq_len or add"
                " text"
            )
        self.consumed = 0
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        """The epoch the next sample comes from."""
        return self.consumed // self.num_samples

    def permutation(self, epoch: int) -> np.ndarray:
        """Window order of `epoch` (cached for the current and next epoch only)."""
        if epoch not in self._perms:
            # A private generator: the loader never touches (or depends on) the global RNG.
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            perm = torch.randperm(self.num_samples, generator=g).numpy()
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return self._perms[epoch]

    def window_indices(self, first: int, count: int) -> np.ndarray:
        """Window index of global samples [first, first + count)."""
        out = np.empty(count, dtype=np.int64)
        for k, s in enumerate(range(first, first + count)):
            epoch, pos = divmod(s, self.num_samples)
            out[k] = self.permutation(epoch)[pos]
        return out

    def next_batch(self, global_batch_size: int) -> torch.Tensor:
        """This rank's rows of the next global batch; advances by the global batch size."""
        lo, hi = _rank_rows(global_batch_size, self.dp_rank, self.dp_world)
        windows = self.window_indices(self.consumed + lo, hi - lo)
        batch = _windows(self.shards, windows * self.seq_len, self.seq_len + 1)
        self.consumed += global_batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": int(self.consumed), "seed": self.seed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state["consumed"]`. The same seed and dataset are required: with another
        of either the global order is a different one and `consumed` means nothing."""
        if int(state["seed"]) != self.seed:
            raise DataError(
                f"data loader state was saved with seed {state['seed']}, this run uses seed"
                f" {self.seed}; resume with the original train.seed"
            )
        if state["fingerprint"] != self.fingerprint:
            raise DataError(
                "data loader state was saved for dataset fingerprint"
                f" {str(state['fingerprint'])[:16]}..., the prepared data has"
                f" {self.fingerprint[:16]}...: the data changed since the checkpoint"
                " (different inputs, tokenizer or settings)"
            )
        consumed = int(state["consumed"])
        if consumed < 0:
            raise ValueError(f"data loader state has negative consumed={consumed}")
        self.consumed = consumed


class ValLoader:
    """Fixed evaluation batches: the first `n_batches * global_batch_size` windows of the val
    split, in stream order, so every evaluation measures the same tokens. Ranks slice each
    global batch like TokenLoader. `n_batches=None` (or more than fit) means every full batch.
    """

    def __init__(
        self,
        shards: ShardSet,
        seq_len: int,
        global_batch_size: int,
        n_batches: int | None = None,
        dp_rank: int = 0,
        dp_world: int = 1,
    ):
        _check_dp(dp_rank, dp_world)
        self.lo, self.hi = _rank_rows(global_batch_size, dp_rank, dp_world)
        self.shards, self.seq_len, self.global_batch_size = shards, seq_len, global_batch_size
        available = (shards.total_tokens - 1) // seq_len // global_batch_size
        if available < 1:
            raise DataError(
                f"the val split in {shards.dir} has {shards.total_tokens} tokens, too few for one"
                f" evaluation batch: eval.batch_size={global_batch_size} windows of"
                f" data.seq_len={seq_len} need {global_batch_size * seq_len + 1}; lower them or"
                " add validation text"
            )
        self.n_batches = available if n_batches is None else min(n_batches, available)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        for b in range(self.n_batches):
            first = b * self.global_batch_size
            windows = np.arange(first + self.lo, first + self.hi, dtype=np.int64)
            yield _windows(self.shards, windows * self.seq_len, self.seq_len + 1)
