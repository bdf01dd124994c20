"""Mixture-of-LoRAs experts merged into the FFN's own weights, for inference.

Nouriborji et al. (arXiv 2512.12880) merge MoL's experts "into one adapter" at inference; the
paper gives no formula. A MoL FFN (neotron/arch/lora.py) computes, per token h,

    MoL(h) = sum_e g_e(h) F(h; W + D_e)      D_{j,e} = (alpha / r) B_{j,e} A_{j,e}, j in w1 w3 w2
    F(h; W) = W2 [SiLU(W1 h) * (W3 h)]

with gates g(h) (router probabilities, top-k of them, renormalized or not). A token-independent
merge has to replace g(h) by one vector; we take its calibration mean g_bar (per FFN, over every
token and every call: each loop of a looped stack), c = sum_e g_bar_e, w = g_bar / c, and

    W1' = W1 + sum_e w_e D_{1,e}        = sum_e w_e W_{1,e}     (convex mix of the experts')
    W3' = W3 + sum_e w_e D_{3,e}        = sum_e w_e W_{3,e}
    W2' = c W2 + sum_e g_bar_e D_{2,e}  = sum_e g_bar_e W_{2,e}

(W_{j,e} = W_j + D_{j,e}, the materialized expert weights), so that MoL'(h) = F(h; W') is a
plain SwiGLU. Why this one: to first order in the D's, MoL(h) = c(h) F(h; W) + J_h[sum_e
g_e(h) D_e] (c(h) = sum_e g_e(h), J_h the FFN's derivative in its weights), and c_bar F(h; W')
has the same expansion with g(h) replaced by g_bar; W2 enters F linearly, so its part is exact
given g_bar. The scale c is kept: un-normalized top-k gates sum to less than 1 and the FFN
trained with that smaller output. The merged deltas are folded into the dense weights rather
than kept as a LoRA: sum_e w_e B_e A_e has rank up to E r (no rank-r adapter holds it), and
averaging A and B separately (B_bar A_bar) is not the average of the products (cross terms
B_e A_f) and depends on each expert's arbitrary factorization (B A = (B M)(M^-1 A)).

Exact when g(h) is the same for every token: one expert, or identical experts under dense or
normalized routing (tests/test_mol_merge.py). The merged model is the run's model with each MoL
FFN replaced by a SwiGLU of the same shape (per-loop LoRA of relaxed recursion, if any, kept as
it is); only dense FFN projections can be merged (a quantized weight plus a delta is not a
quantized weight).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from neotron.arch.linear import DenseLinear
from neotron.arch.lora import MoLFFN
from neotron.errors import UsageError


def mol_modules(model: nn.Module) -> dict[str, MoLFFN]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoLFFN)}


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor],
              run: Callable[[torch.Tensor], object]) -> dict[str, torch.Tensor]:
    """Mean gate vectors of every MoL FFN over all tokens of `batches`, per call of a forward
    (call k = loop k of a looped stack): [calls, E] fp64. `run(batch)` is the model's forward.
    Every call of one FFN sees the same number of tokens, so the mean over calls is the mean
    over all of them (g_bar)."""
    mols = mol_modules(model)
    sums: dict[str, list[torch.Tensor]] = {name: [] for name in mols}
    tokens: dict[str, list[int]] = {name: [] for name in mols}
    calls = dict.fromkeys(mols, 0)

    def record(name: str):
        def hook(module: MoLFFN, args: tuple) -> None:
            h = args[0].reshape(-1, args[0].shape[-1])
            _, g = module.gates(h)
            k = calls[name]
            calls[name] += 1
            if k == len(sums[name]):
                sums[name].append(torch.zeros(module.cfg.experts, dtype=torch.float64))
                tokens[name].append(0)
            sums[name][k] += g.double().sum(0).cpu()
            tokens[name][k] += h.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in mols.items()]
    try:
        for batch in batches:
            calls = dict.fromkeys(mols, 0)
            run(batch)
    finally:
        for h in handles:
            h.remove()
    if any(not t for t in tokens.values()):
        raise UsageError("--merge-mol: the calibration forward reached no MoL FFN")
    return {name: torch.stack([s / n for s, n in zip(sums[name], tokens[name])])
            for name in mols}


@torch.no_grad()
def merged_ffn_weights(mol: MoLFFN, g_bar: torch.Tensor) -> dict[str, torch.Tensor]:
    """W1', W3', W2' (the module docstring's formulas) for one MoL FFN, in its weights' dtype."""
    c = g_bar.sum()
    out = {}
    for name in ("w1", "w3", "w2"):
        proj = getattr(mol, name)
        W = proj.weight.double()
        if name in mol.experts:
            f = mol.experts[name]
            coef = g_bar if name == "w2" else g_bar / c
            W = (c if name == "w2" else 1.0) * W + f.scale * torch.einsum(
                "e,eor,eri->oi", coef.to(W), f.B.double(), f.A.double())
        elif name == "w2":
            W = c * W
        out[name] = W.to(proj.weight.dtype)
    return out


def check_mergeable(model: nn.Module, where: str) -> dict[str, MoLFFN]:
    mols = mol_modules(model)
    if not mols:
        raise UsageError(f"--merge-mol: {where} has no Mixture-of-LoRAs FFN"
                         " (model.blocks.<name>.ffn.type: mol); nothing to merge")
    for name, m in mols.items():
        for proj in ("w1", "w3", "w2"):
            if type(getattr(m, proj)) is not DenseLinear:
                raise UsageError(f"--merge-mol: {name}.{proj} is a {type(getattr(m, proj)).__name__},"
                                 " not a dense projection; only dense FFN weights can absorb the"
                                 " merged experts")
    return mols


def merged_state(model: nn.Module, g_bars: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of the merged model: every MoL FFN's router and experts dropped, its
    w1 / w3 / w2 weights replaced by the merged ones."""
    state = {k: v for k, v in model.state_dict().items()}
    for name, mol in mol_modules(model).items():
        for key in [k for k in state if k.startswith(f"{name}.experts.") or k == f"{name}.router"]:
            del state[key]
        for proj, w in merged_ffn_weights(mol, g_bars[name]).items():
            state[f"{name}.{proj}.weight"] = w
    return state


def merged_model_config(model_cfg):
    """The ModelConfig of the merged model: each `mol` FFN a `swiglu` of the same shape."""
    from neotron.arch.mlp import SwiGLUConfig

    data = model_cfg.model_dump()
    for name, block in model_cfg.blocks.items():
        if block.ffn.type == "mol":
            data["blocks"][name]["ffn"] = {
                "type": "swiglu", **{k: getattr(block.ffn, k)
                                     for k in SwiGLUConfig.model_fields if k != "type"}}
    return type(model_cfg).model_validate(data)
