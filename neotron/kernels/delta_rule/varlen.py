"""Shared plumbing for the delta-rule kernels: input checks, compute dtype and the
`cu_seqlens` (packed variable-length) conventions.

`cu_seqlens` follows flash-attn / fla: a LongTensor [0, l1, l1+l2, ..., T_total] over a batch of
size 1 whose documents are concatenated along time. The recurrent state restarts from the
document's own initial state (initial_state[i], shape [num_seqs, H, d_k, d_v]) at each boundary,
and the final state is returned per document, so fla's kernels are a drop-in replacement.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 stays fp64 (for tight tests); every lower precision is upcast to fp32, because the
    delta rule's state is a running sum whose bf16 rounding error grows with sequence length."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def seq_bounds(cu_seqlens: Tensor | None, batch: int, time: int) -> list[int] | None:
    """Validate `cu_seqlens` against a [batch, time, ...] input and return it as a Python list."""
    if cu_seqlens is None:
        return None
    if batch != 1:
        raise ValueError(
            f"with cu_seqlens the batch size must be 1 (packed documents), got {batch}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be 1-D with at least two entries [0, ..., T_total]")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != time:
        raise ValueError(f"cu_seqlens must start at 0 and end at T_total={time}, got {bounds}")
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    return bounds


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
) -> list[int] | None:
    """Shape checks shared by every implementation; returns the document bounds (or None)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [batch, time, heads, d_k]; got {q.shape}, {k.shape}")
    b, t, h, dk = q.shape
    if v.dim() != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"v must be [batch, time, heads, d_v] matching q; got {v.shape}")
    if beta.shape != (b, t, h):
        raise ValueError(f"beta must be [batch, time, heads] = {(b, t, h)}; got {beta.shape}")
    if g is not None and g.shape != (b, t, h):
        raise ValueError(f"g must be [batch, time, heads] = {(b, t, h)}; got {g.shape}")
    bounds = seq_bounds(cu_seqlens, b, t)
    if initial_state is not None:
        n = b if bounds is None else len(bounds) - 1
        want = (n, h, dk, v.shape[-1])
        if initial_state.shape != want:
            raise ValueError(
                f"initial_state must be [{'num_seqs' if bounds else 'batch'}, heads, d_k, d_v]"
                f" = {want}; got {tuple(initial_state.shape)}"
            )
    return bounds


@dataclass
class PackPlan:
    """Where each packed document goes in the chunked layout [rows, chunks * chunk_size].

    Documents are padded to whole chunks and laid out back to back in `rows` independent rows
    (each row is one lane of the sequential inter-chunk state pass). Rows are filled longest
    document first onto the least loaded row (LPT scheduling), with as many rows as the longest
    document allows, so the sequential pass is about as short as the longest document and
    little compute is spent on padding.
    """

    rows: int
    chunks: int
    gather: Tensor  # [rows * chunks * C] indices into the packed time axis; T_total = padding
    scatter: Tensor  # [T_total] positions of the packed tokens in the flattened layout
    first_seq: Tensor  # [rows] document whose initial state seeds each row
    # chunk index -> (rows that start a new document there [rows] bool, its document [rows])
    resets: dict[int, tuple[Tensor, Tensor]]
    end_step: list[int]  # per document: chunk whose end holds its final state (-1 if empty)
    end_row: list[int]


def pack_plan(bounds: list[int], chunk_size: int, device: torch.device) -> PackPlan:
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    nchunks = [-(-n // chunk_size) for n in lens]
    total, longest = sum(nchunks), max(nchunks)
    rows = max(1, -(-total // longest)) if longest else 1
    heap = [(0, r) for r in range(rows)]  # (load in chunks, row)
    placed: list[tuple[int, int]] = [(-1, -1)] * len(lens)  # (row, first chunk) per document
    for i in sorted(range(len(lens)), key=lambda i: -nchunks[i]):
        if nchunks[i] == 0:
            continue
        load, r = heapq.heappop(heap)
        placed[i] = (r, load)
        heapq.heappush(heap, (load + nchunks[i], r))
    chunks = max(1, max(load for load, _ in heap))
    row_len = chunks * chunk_size

    t_total = bounds[-1]
    gather = torch.full((rows * row_len,), t_total, dtype=torch.long)
    scatter = torch.empty(t_total, dtype=torch.long)
    first_seq = [0] * rows
    reset_at: dict[int, list[tuple[int, int]]] = {}
    end_step, end_row = [], []
    for i, (r, c0) in enumerate(placed):
        end_step.append(c0 + nchunks[i] - 1 if r >= 0 else -1)
        end_row.append(r)
        if r < 0:
            continue
        pos = torch.arange(lens[i]) + r * row_len + c0 * chunk_size
        gather[pos] = torch.arange(bounds[i], bounds[i + 1])
        scatter[bounds[i] : bounds[i + 1]] = pos
        if c0 == 0:
            first_seq[r] = i
        else:
            reset_at.setdefault(c0, []).append((r, i))
    resets = {}
    for c, lst in reset_at.items():
        mask = torch.zeros(rows, dtype=torch.bool)
        idx = torch.zeros(rows, dtype=torch.long)
        for r, i in lst:
            mask[r], idx[r] = True, i
        resets[c] = (mask.to(device), idx.to(device))
    return PackPlan(
        rows=rows,
        chunks=chunks,
        gather=gather.to(device),
        scatter=scatter.to(device),
        first_seq=torch.tensor(first_seq, dtype=torch.long, device=device),
        resets=resets,
        end_step=end_step,
        end_row=end_row,
    )
