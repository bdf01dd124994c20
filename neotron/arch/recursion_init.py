"""A trained dense model's weights mapped onto a recursive (looped, relaxed) model.

Bae et al., "Relaxed Recursive Transformers", arXiv 2410.20672, section 3: a dense model of
L K layers becomes L shared blocks looped K times (CYCLE: dense layer k L + i -> block i):

    W'_i = (1/K) sum_k W_{kL+i}                         the paper's "Average" initialization
    R_k  = W_{kL+i} - W'_i;  U S V^T = SVD(R_k)          per loop k, per relaxed projection
    B_k  = U_r S_r / (alpha / r),  A_k = V_r^T           so (alpha / r) B_k A_k = best rank-r R_k

With r = min(out, in) the relaxed projection is the dense one exactly. Everything else of the
block (norm gains, biases, convolutions, gates) is averaged too, except the two pre-norm gains
with `per_depth_norms`, which are taken per loop: with full-rank LoRA on every projection of
an attention + SwiGLU block, the recursive model then computes the dense model's function.

Used by `train.init_from` (neotron/train/init_from.py) when a recursive model starts from a
dense parent; the tensors come from neotron.convert.load_model_tensors.
"""

from __future__ import annotations

import re

import torch

from neotron.arch.stack import recursion_of
from neotron.errors import ConfigError

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def _layer_count(tensors: dict[str, torch.Tensor]) -> int:
    idx = [int(m.group(1)) for k in tensors if (m := _LAYER.match(k))]
    return max(idx) + 1 if idx else 0


def needs_mapping(tensors: dict[str, torch.Tensor], cfg) -> bool:
    """True when `tensors` are a dense parent of the looped model `cfg` describes (L K layers,
    no LoRA tensors), False when they already have the model's own layout."""
    rec = recursion_of(cfg)
    if rec.loops == 1 and rec.lora is None:
        return False
    return not any(".lora." in k for k in tensors) and _layer_count(tensors) != cfg.n_layers


def to_recursive(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """The state dict of the recursive model `cfg` (a ModelConfig) from a dense state dict
    with n_layers * loops layers."""
    from neotron.arch.lora import lora_targets
    from neotron.arch.model import build_model

    rec = recursion_of(cfg)
    L, K = cfg.n_layers, rec.loops
    have = _layer_count(tensors)
    if have != L * K:
        raise ConfigError(f"train.init_from: the parent has {have} layers; a recursive model of"
                          f" {L} layers x {K} loops is initialized from {L * K} (CYCLE sharing)")
    model = build_model(cfg)  # meta device: names and shapes only
    want = model.state_dict()
    # outside the stack: as they are (init_from reports what does not fit)
    out = {k: v for k, v in tensors.items() if not _LAYER.match(k)}
    for name, t in want.items():
        m = _LAYER.match(name)
        if m is None:
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest.startswith("lora."):
            continue
        src = [tensors.get(f"layers.{i + k * L}.{rest}") for k in range(K)]
        if any(s is None for s in src):
            continue  # left for init_from's mismatch report
        stacked = torch.stack([s.double() for s in src])
        if tuple(t.shape) == (K, *src[0].shape):  # per-loop gains
            out[name] = stacked.to(src[0].dtype)
        else:
            out[name] = stacked.mean(0).to(src[0].dtype)
    if rec.lora is None:
        return out
    r, scale = rec.lora.rank, rec.lora.scale
    for i, block in enumerate(model.layers):
        for path in lora_targets(block, rec.lora.targets):
            key = f"layers.{i}.lora.adapters.{path.replace('.', '_')}"
            shared = out[f"layers.{i}.{path}.weight"].double()
            A = torch.zeros(want[f"{key}.A"].shape, dtype=torch.float64)
            B = torch.zeros(want[f"{key}.B"].shape, dtype=torch.float64)
            for k in range(K):
                residual = tensors[f"layers.{i + k * L}.{path}.weight"].double() - shared
                U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
                n = min(r, S.numel())
                B[k, :, :n] = U[:, :n] * S[:n] / scale
                A[k, :n] = Vh[:n]
            dtype = tensors[f"layers.{i}.{path}.weight"].dtype
            out[f"{key}.A"], out[f"{key}.B"] = A.to(dtype), B.to(dtype)
    return out
