"""Rotary position embedding (Su et al., arXiv 2104.09864).

Two layouts of the rotated pairs, a reparameterization of each other (a fixed permutation of
the q/k projection rows within each head maps one to the other):

- rotate-half (`apply_rope`, default): frequency i rotates the pair (x_i, x_{i + D/2});
  Llama / Hugging Face layout;
- interleaved (`apply_rope_interleaved`): frequency i rotates the pair (x_{2i}, x_{2i+1});
  the original RoFormer / Meta Llama / EasyLM layout, and the official TTT code's
  (test-time-training/ttt-lm-pytorch@cd831db10c ttt.py `permute_qk` / `undo_permute_qk`
  around a rotate-half RoPE, written to match its JAX training code).
"""

from __future__ import annotations

import torch


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, head_dim // 2] in fp32.

    Computed per forward rather than cached in a buffer: buffers on the meta device need
    recomputing after `to_empty`, and this costs T * head_dim / 2 flops.
    """
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [T, D/2] or [B, T, D/2]."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """As `apply_rope`, rotating the adjacent pairs (x_{2i}, x_{2i+1}) by frequency i."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    wide = torch.promote_types(x.dtype, torch.float32)
    pairs = x.to(wide).unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(wide), sin.to(wide)
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return out.to(x.dtype)
