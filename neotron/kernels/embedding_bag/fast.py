"""Weighted embedding bag with a hand-written backward that never materializes the gathered
rows [N, L, D], nor, on its sparse path, a gradient of the table's size.

Forward: torch's fused `F.embedding_bag(mode="sum", per_sample_weights=...)` (one pass, no
[N, L, D] intermediate, CPU and CUDA).

Backward, for an output gradient g [N, D]:
- weights: grad_w[n, l] = <g[n], table[idx[n, l]]>, by ATen's fused gather-dot when it is
  there (`_embedding_bag_per_sample_weights_backward`), else in chunks of tokens so that the
  gathered rows stay below `CHUNK_ELEMS` elements at a time;
- table: each read slot l adds weights[:, l] * g into the rows idx[:, l] (`index_add_`, an
  [N, D] temporary per slot: never the [N * L, D] rows of the reference, no sort). By default
  into a dense gradient, which is what AdamW, gradient clipping and FSDP2 expect of a
  parameter: one table-sized buffer, the parameter's .grad itself. `sparse_grad=True`
  compacts the U rows that were read (a presence map, no sort) and returns a sparse COO
  gradient of U rows (nothing [R, D]-sized is allocated), for optimizers that take
  sparse gradients (torch.optim.SparseAdam).
  Half-precision gradients are accumulated in fp32. On CUDA `index_add_` uses atomics
  (bitwise reproducible only under torch.use_deterministic_algorithms).

The kernels of facebookresearch/memory (lingua/product_key, Triton) and C0-Design/MemoryFormer
(CUDA gather) solve the same problem with atomics; this is our own formulation in PyTorch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Elements of gathered rows held at once for the weights' gradient: 1 MiB of fp32 stays in
# cache, which measured ~2x faster on CPU than 64 MiB chunks.
CHUNK_ELEMS = 1 << 18


def _fused_weights_grad(table: torch.Tensor, idx: torch.Tensor, g: torch.Tensor
                        ) -> torch.Tensor | None:
    """ATen's fused gather-dot (the op autograd uses for embedding_bag's per-sample weights):
    no gathered rows at all, 20-40x faster on CPU than gathering. None if unavailable."""
    op = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
    if op is None or g.dtype != table.dtype:
        return None
    N, L = idx.shape
    offsets = torch.arange(0, N * L, L, device=idx.device)
    offset2bag = torch.arange(N, device=idx.device).repeat_interleave(L)
    try:
        return op(g, table, idx.reshape(-1), offsets, offset2bag, 0, -1).view(N, L)
    except (RuntimeError, NotImplementedError):
        return None


def _gathered_weights_grad(table: torch.Tensor, idx: torch.Tensor, g: torch.Tensor
                           ) -> torch.Tensor:
    """grad_w[n, l] = <g[n], table[idx[n, l]]>, gathering chunks of rows."""
    N, L = idx.shape
    D = table.shape[1]
    step = max(1, CHUNK_ELEMS // max(1, L * D))
    out = torch.empty(N, L, dtype=g.dtype, device=g.device)
    for s in range(0, N, step):
        rows = torch.index_select(table, 0, idx[s : s + step].reshape(-1)).to(g.dtype)
        out[s : s + step] = torch.bmm(rows.view(-1, L, D), g[s : s + step].unsqueeze(-1)).squeeze(-1)
    return out


def _weights_grad(table: torch.Tensor, idx: torch.Tensor, g: torch.Tensor,
                  fused: bool = True) -> torch.Tensor:
    out = _fused_weights_grad(table, idx, g) if fused else None
    return out if out is not None else _gathered_weights_grad(table, idx, g)


def _accumulate_rows(out: torch.Tensor, rows_of: torch.Tensor, weights: torch.Tensor,
                     g: torch.Tensor) -> torch.Tensor:
    """out[rows_of[n, l]] += weights[n, l] * g[n], one read slot l at a time: an [N, D]
    temporary, never [N * L, D]."""
    for slot in range(rows_of.shape[1]):
        out.index_add_(0, rows_of[:, slot], g * weights[:, slot : slot + 1].to(g.dtype))
    return out


def table_row_grads(
    idx: torch.Tensor, weights: torch.Tensor, g: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows read (sorted, int64 [U]) and their gradients [U, D] (fp32 or wider)."""
    g = g.to(torch.promote_types(g.dtype, torch.float32))
    present = torch.zeros(n_rows, dtype=torch.bool, device=idx.device)
    present[idx.reshape(-1)] = True  # a presence map instead of a sort (torch.unique)
    uniq = present.nonzero().squeeze(1)
    compact = present.cumsum(0) - 1  # row -> its position among the rows read
    rows = g.new_zeros(uniq.numel(), g.shape[1])
    return uniq, _accumulate_rows(rows, compact[idx], weights, g)


class _EmbeddingBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, table, idx, weights, sparse_grad: bool):  # type: ignore[override]
        ctx.save_for_backward(table, idx, weights)
        ctx.sparse_grad = sparse_grad
        return F.embedding_bag(idx, table, per_sample_weights=weights.to(table.dtype),
                               mode="sum")

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        table, idx, weights = ctx.saved_tensors
        g = g.contiguous()
        grad_table = grad_w = None
        if ctx.needs_input_grad[2]:
            grad_w = _weights_grad(table, idx, g).to(weights.dtype)
        if ctx.needs_input_grad[0]:
            if ctx.sparse_grad:
                uniq, rows = table_row_grads(idx, weights, g, table.shape[0])
                grad_table = torch.sparse_coo_tensor(
                    uniq.unsqueeze(0), rows.to(table.dtype), table.shape, is_coalesced=True,
                    check_invariants=False)
            else:
                wide = torch.promote_types(table.dtype, torch.float32)
                grad = torch.zeros(table.shape, dtype=wide, device=table.device)
                grad_table = _accumulate_rows(grad, idx, weights, g.to(wide)).to(table.dtype)
        return grad_table, None, grad_w, None


def embedding_bag_fast(
    table: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, *, sparse_grad: bool = False
) -> torch.Tensor:
    """table [R, D], idx [N, L] int64, weights [N, L] -> [N, D] (table's dtype)."""
    return _EmbeddingBag.apply(table, idx, weights, sparse_grad)
