"""Short causal depthwise convolution (kernel 4 by default) + SiLU, document-aware.

Used on the q/k/v projections of DeltaNet and Gated DeltaNet (Yang et al., arXiv 2406.06484,
section 4, "short convolution"; the same device as H3 / Mamba), and optionally by TTT (the
official JAX Mamba-backbone configs convolve q/k before the inner loop).

Per channel c, with weights w[c, 0..K-1] and w[c, K-1] on the current token:

    y_t = act( sum_{s=0}^{K-1} w[c, K-1-s] * x_{t-s} ),   x_{t-s} := 0 if t-s < 0 or if token
                                                          t-s belongs to another document.

The zeroing across documents makes a packed row behave exactly like its documents run one by
one (no information leaks from the previous document through the convolution).

The conv is torch's depthwise conv1d; the few products that cross a document boundary (the
first K-1 tokens of each document) are subtracted afterwards, so the document-aware conv costs
about what the plain one does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def _leaks(doc_ids: Tensor, kernel: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where a plain causal conv reads x_{t-s} from another document: rows b, times t and
    shifts s (1 <= s < kernel) of every such product. Only the first kernel-1 tokens after a
    document boundary have any, so there are few."""
    bs, ts, ss = [], [], []
    for s in range(1, min(kernel, doc_ids.shape[1])):
        b, t = (doc_ids[:, s:] != doc_ids[:, :-s]).nonzero(as_tuple=True)
        bs.append(b)
        ts.append(t + s)
        ss.append(torch.full_like(b, s))
    if not bs:
        e = doc_ids.new_zeros(0, dtype=torch.long)
        return e, e, e
    return torch.cat(bs), torch.cat(ts), torch.cat(ss)


def _conv(x: Tensor, w: Tensor, doc_ids: Tensor | None, silu: bool) -> Tensor:
    """Depthwise causal conv1d (fast on CPU and GPU), minus the few products that cross a
    document boundary, then SiLU. x: [B, T, C], w: [C, K]; returns [B, T, C] contiguous."""
    B, T, C = x.shape
    K = w.shape[1]
    w = w.to(x.dtype)
    pre = F.conv1d(x.transpose(1, 2), w[:, None, :], padding=K - 1, groups=C)[..., :T]
    pre = pre.transpose(1, 2).contiguous()
    if doc_ids is not None:
        b, t, s = _leaks(doc_ids, K)
        if b.numel():
            leak = x[b, t - s] * w[:, K - 1 - s].t()  # [n, C]
            pre = pre.index_put((b, t), -leak, accumulate=True)
    return F.silu(pre) if silu else pre


def short_conv(
    x: Tensor, weight: Tensor, doc_ids: Tensor | None = None, *, silu: bool = True
) -> Tensor:
    """Causal depthwise conv of x [B, T, C] with weight [C, K] (w[:, K-1] on the current token),
    reset at document boundaries when doc_ids [B, T] is given; SiLU after when `silu`."""
    return _conv(x, weight, doc_ids, silu)


class ShortConv(nn.Module):
    """Depthwise causal conv over the channels of one projection, with a decoding step."""

    def __init__(self, channels: int, kernel_size: int = 4, silu: bool = True) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.silu = silu
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))

    def init_weights(self, std: float | None = None) -> None:
        """std None (neotron): nn.Conv1d's default for a depthwise conv, U(-1/sqrt(K), 1/sqrt(K))
        with fan_in = K; a float: N(0, std^2), fla's models' re-initialization of every
        ShortConvolution (an nn.Conv1d) to N(0, initializer_range = 0.02)
        (fla-org/flash-linear-attention@bc3b101dcb, fla/models/*/modeling_*.py `_init_weights`)."""
        if std is not None:
            nn.init.normal_(self.weight, mean=0.0, std=std)
            return
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        return short_conv(x, self.weight, doc_ids, silu=self.silu)

    def init_state(self, batch: int, *, device=None, dtype=None) -> Tensor:
        """The last K-1 inputs, oldest first: [B, K-1, C] (zeros = start of a document)."""
        return torch.zeros(batch, self.kernel_size - 1, self.weight.shape[0], device=device,
                           dtype=dtype or self.weight.dtype)

    def state_after(self, x: Tensor) -> Tensor:
        """The `step` state after the inputs x [B, T, C] of one document: its last K-1 inputs,
        zeros in front when T < K-1 (as `init_state`)."""
        pad = max(0, self.kernel_size - 1 - x.shape[1])
        return F.pad(x, (0, 0, pad, 0))[:, x.shape[1] + pad - (self.kernel_size - 1):]

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One token: x_t [B, C] and the state from `init_state` / the previous step."""
        window = torch.cat([state.to(x_t.dtype), x_t[:, None]], dim=1)  # [B, K, C], oldest first
        y = (window * self.weight.to(x_t.dtype).t()[None]).sum(1)
        return (F.silu(y) if self.silu else y), window[:, 1:]

    def flops_per_token(self) -> float:
        # forward: K multiply-adds per channel; backward: the same for the input gradient and
        # again for the weight gradient (SiLU is elementwise, not counted).
        return 3 * 2.0 * self.kernel_size * self.weight.shape[0]
