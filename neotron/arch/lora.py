"""Per-depth LoRA for a shared (looped) stack, and the Mixture-of-LoRAs FFN.

- Relaxed recursion: Bae et al., "Relaxed Recursive Transformers: Effective Parameter Sharing
  with Layer-wise LoRA", ICLR 2025, arXiv 2410.20672. A projection W' shared by the K loops of
  the stack gets, at loop k, its own low-rank correction:

      y = W' x + (alpha / r) B_k A_k x          A_k [r, in], B_k [out, r]; B_k = 0 at init

  so a freshly built relaxed model computes exactly the plain recursive model.
- Mixture of LoRAs (MoL): Nouriborji, Rohanian, Rohanian, "Improving Recursive Transformers
  with Mixture of LoRAs", arXiv 2512.12880 (ModernALBERT). Expert i modulates the shared FFN
  in weight space, and a token's output is the router-weighted sum of the expert FFNs. For
  our SwiGLU FFN (W1 gate, W3 up, W2 down; the paper's FFN is a GeGLU, the form is the same):

      W_j,i = W_j + (alpha / r) B_j,i A_j,i             j in `targets` (others: W_j,i = W_j)
      FFN_i(h) = W2,i [SiLU(W1,i h) * (W3,i h)]
      p = softmax(W_r h)                                 router over E experts (fp32)
      g = p (dense) | top-k of p, zero elsewhere (renormalized with `normalize_gates`)
      MoL(h) = sum_i g_i FFN_i(h)

  Computed without materializing any W_j,i: W1 h and W3 h once, each expert adds its low-rank
  term (B (A h)) to them, and since W2 is linear the down projection is applied once to the
  gate-mixed hidden, sum_i g_i W2 u_i = W2 (sum_i g_i u_i), plus each expert's low-rank term.
  Top-k routing is computed densely (the unselected experts get gate 0): the math of top-k,
  the cost of dense routing (counted so by `flops_per_token`); fine at the handful of experts
  the paper uses, and it keeps shapes static for torch.compile.

  Load balancing (Switch Transformer, Fedus et al. 2021, eq. 4):
      aux = E * sum_i f_i P_i,   f_i = share of the token's top-k (top-1 for dense routing)
      slots that go to expert i, P_i = mean router probability of expert i
  (1 when balanced), times `aux_loss_coef`, summed over every MoL call of a forward (each
  layer, each loop), as Switch sums over layers. The trainer adds it to the loss through
  `collect_aux` and logs the router statistics it returns.

LoRA factors are stored stacked, [K or E, r, in] and [K or E, out, r], and have the optimizer
role `lora` (AdamW, no weight decay; neotron/optim/routing.py, docs/recursion.md says why).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from neotron.arch.context import BuildContext, SeqInfo
from neotron.arch.linear import DenseLinear, make_linear
from neotron.arch.mlp import SwiGLUConfig
from neotron.arch.registry import FFNS
from neotron.strict import StrictModel

LORA_ROLE = "lora"  # optimizer role of every LoRA factor (neotron/optim/routing.py)


def pick(t: torch.Tensor, i: torch.Tensor | int) -> torch.Tensor:
    """t[i] for an int or a 1-element int64 tensor i (index_select: torch.compile traces a
    tensor index into the graph instead of specializing on its value)."""
    return t.index_select(0, i).squeeze(0) if isinstance(i, torch.Tensor) else t[i]


def init_lora_(A: torch.Tensor, B: torch.Tensor) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (Hu et al.'s reference init, nn.Linear's default), B = 0:
    the adapter starts as the identity correction, whatever A."""
    bound = 1.0 / math.sqrt(A.shape[-1])
    nn.init.uniform_(A, -bound, bound)
    nn.init.zeros_(B)


class LoRAFactors(nn.Module):
    """n adapters of rank r for one [in -> out] projection: A [n, r, in], B [n, out, r]."""

    _neotron_param_groups = {"A": LORA_ROLE, "B": LORA_ROLE}

    def __init__(self, n: int, in_dim: int, out_dim: int, rank: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.A = nn.Parameter(torch.empty(n, rank, in_dim))
        self.B = nn.Parameter(torch.empty(n, out_dim, rank))

    def init_weights(self) -> None:
        init_lora_(self.A, self.B)

    def delta(self, x: torch.Tensor, i: torch.Tensor | int) -> torch.Tensor:
        """(alpha / r) B_i A_i x for x [..., in]."""
        return F.linear(F.linear(x, pick(self.A, i)), pick(self.B, i)) * self.scale

    def flops_per_token(self) -> float:
        """Training FLOPs of one adapter (x A^T, then B): 6 r (in + out)."""
        _, r, n_in = self.A.shape
        return 6.0 * r * (n_in + self.B.shape[1])


# ------------------------------------------------------------------ per-depth LoRA


class LoRAConfig(StrictModel):
    rank: int = Field(default=8, gt=0, description="r of every per-depth adapter")
    alpha: float | None = Field(default=None, gt=0,
                                description="the update is (alpha / r) B A; None = r (scale 1)")
    targets: list[str] = Field(
        default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
        description="projections of each shared block to relax, by name inside the block"
        " ('mixer.wq') or by last component ('wq', every match); each must match a"
        " projection of some block",
    )
    per_depth_norms: bool = Field(
        default=False,
        description="each loop gets its own gains of the block's two pre-norms (mixer_norm,"
        " ffn_norm; dim parameters per layer per loop). Needed for an exact conversion from a"
        " dense model (the averaged gains are otherwise all that is left)",
    )

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def _is_projection(module: nn.Module) -> bool:
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int)


def lora_targets(block: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """path inside `block` -> projection, for every projection a target names (the stack
    checks that each target matches in some block)."""
    found: dict[str, nn.Module] = {}
    for n, m in block.named_modules():
        if n and _is_projection(m) and any(n == t or n.rsplit(".", 1)[-1] == t for t in targets):
            found[n] = m
    return found


class DepthNorm(nn.Module):
    """RMSNorm with one gain vector per loop: weight [K, dim] (`per_depth_norms`)."""

    _neotron_param_groups = {"weight": "no_decay"}

    def __init__(self, loops: int, dim: int, eps: float, owner: DepthLoRA) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(loops, dim))
        self._owner = [owner]  # a list: not registered as a child module

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = pick(self.weight, self._owner[0].depth)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * w.float()).to(x.dtype)


def _add_lora(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of a relaxed projection: its output plus the current loop's LoRA."""
    owner, key = module._neotron_lora
    return out + owner.adapters[key].delta(args[0], owner.depth)


class DepthLoRA(nn.Module):
    """The per-loop adapters of one shared block: `adapters[path]` holds K LoRA pairs for the
    projection at `path`, added to its output by a forward hook. `depth` (the current loop) is
    set by the block's forward from its SeqInfo (stack.LoopBlock), so a recomputation under
    activation checkpointing sees the loop of the forward it replays."""

    def __init__(self, block: nn.Module, cfg: LoRAConfig, loops: int) -> None:
        super().__init__()
        self.depth = 0
        self.adapters = nn.ModuleDict()
        for path, proj in lora_targets(block, cfg.targets).items():
            key = path.replace(".", "_")
            self.adapters[key] = LoRAFactors(loops, proj.in_features, proj.out_features,
                                             cfg.rank, cfg.scale)
            # a plain attribute (a tuple is not registered): deepcopy maps it to the copy
            proj._neotron_lora = (self, key)
            proj.register_forward_hook(_add_lora)

    def init_weights(self) -> None:
        for factors in self.adapters.values():
            factors.init_weights()

    def flops_per_token(self) -> float:
        """One loop applies one adapter per target."""
        return sum(f.flops_per_token() for f in self.adapters.values())


# ------------------------------------------------------------------ Mixture of LoRAs


class MoLConfig(SwiGLUConfig):
    type: Literal["mol"] = "mol"  # type: ignore[assignment]
    experts: int = Field(default=4, ge=1, description="E LoRA experts")
    rank: int = Field(default=8, gt=0, description="r of each expert's adapters")
    alpha: float | None = Field(default=None, gt=0, description="scale alpha / r; None = r")
    targets: list[Literal["w1", "w3", "w2"]] = Field(
        default_factory=lambda: ["w1", "w3", "w2"],
        description="FFN projections the experts modulate (w1 gate, w3 up, w2 down)")
    top_k: int | None = Field(default=None, gt=0,
                              description="experts per token; None = dense routing (all E)")
    normalize_gates: bool = Field(
        default=False, description="renormalize the top-k probabilities to sum to 1 (with"
        " top_k 1 the router then learns from the balance loss only)")
    aux_loss_coef: float = Field(default=0.01, ge=0,
                                 description="load-balancing loss weight, per MoL call")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def check(self, dim: int) -> list[tuple[str, str]]:
        errors = []
        if self.top_k is not None and self.top_k > self.experts:
            errors.append(("top_k", f"top_k={self.top_k} > experts={self.experts}"))
        if not self.targets or len(set(self.targets)) != len(self.targets):
            errors.append(("targets", "must name each of w1, w3, w2 at most once, at least one"))
        return errors


@FFNS.register(MoLConfig)
class MoLFFN(nn.Module):
    """SwiGLU whose weights each token sees modulated by a router-weighted mix of LoRA
    experts. Each training forward adds its balance loss and router statistics to `acc`
    (read and cleared by `collect_aux`; cleared at every model forward by the stack)."""

    def __init__(self, ctx: BuildContext, *, cfg: MoLConfig) -> None:
        super().__init__()
        self.ctx, self.cfg = ctx, cfg
        hidden = cfg.hidden(ctx.dim)
        self.w1 = make_linear(ctx.dim, hidden, ctx.linear)  # gate
        self.w3 = make_linear(ctx.dim, hidden, ctx.linear)  # up
        self.w2 = make_linear(hidden, ctx.dim, ctx.linear)  # down
        # The router is a plain matrix (never quantized); AdamW: orthogonalizing an E x dim
        # router would force every expert's logit direction to the same norm.
        self.router = nn.Parameter(torch.empty(cfg.experts, ctx.dim))
        self._neotron_param_groups = {"router": "adamw"}
        dims = {"w1": (ctx.dim, hidden), "w3": (ctx.dim, hidden), "w2": (hidden, ctx.dim)}
        self.experts = nn.ModuleDict({
            t: LoRAFactors(cfg.experts, *dims[t], cfg.rank, cfg.scale) for t in cfg.targets})
        # Sum of `_balance` over this forward's calls (one per loop), or None: a tensor, not a
        # list, so torch.compile sees the same attribute type at every call.
        self.acc: torch.Tensor | None = None

    def init_weights(self) -> None:
        std = self.ctx.init_std
        self.w1.init_weights(std)
        self.w3.init_weights(std)
        self.w2.init_weights(self.ctx.out_std)
        nn.init.trunc_normal_(self.router, std=std, a=-3 * std, b=3 * std)
        for f in self.experts.values():
            f.init_weights()

    def gates(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(router probabilities p [N, E] in fp32, gates g [N, E] in fp32)."""
        p = F.linear(h.float() if h.dtype != torch.float64 else h,
                     self.router.to(torch.promote_types(h.dtype, torch.float32))).softmax(-1)
        k = self.cfg.top_k
        if k is None or k == self.cfg.experts:
            return p, p
        vals, idx = p.topk(k, dim=-1)
        if self.cfg.normalize_gates:
            vals = vals / vals.sum(-1, keepdim=True)
        return p, torch.zeros_like(p).scatter(-1, idx, vals)

    def _expert_in(self, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """base [N, out] -> [N, E, out] with each expert's low-rank term of projection `name`
        added (or [N, 1, out] when the experts leave it alone)."""
        f = self.experts[name] if name in self.experts else None
        if f is None:
            return base[:, None]
        low = torch.einsum("nd,erd->ner", x, f.A)
        return base[:, None] + torch.einsum("ner,eor->neo", low, f.B) * f.scale

    def forward(self, x: torch.Tensor, seq: SeqInfo) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        p, g = self.gates(h)
        g = g.to(h.dtype)
        u = F.silu(self._expert_in("w1", h, self.w1(h))) * self._expert_in("w3", h, self.w3(h))
        if u.shape[1] == 1:
            mixed = u[:, 0] * g.sum(-1, keepdim=True)
        else:
            mixed = torch.einsum("ne,neh->nh", g, u)
        if type(self.w2) is DenseLinear:  # linear: one down projection of the mixed hidden
            out = self.w2(mixed)
        else:  # BitLinear / FP4 / Pattention are not linear maps: project each expert
            out = torch.einsum("ne,ned->nd", g, self.w2(u))
        if "w2" in self.experts:
            f = self.experts["w2"]
            low = torch.einsum("neh,erh->ner", u.expand(-1, self.cfg.experts, -1), f.A)
            out = out + torch.einsum("ne,ner,edr->nd", g, low, f.B) * f.scale
        if torch.is_grad_enabled():  # training: accumulate the balance loss and statistics
            rec = self._balance(p)
            self.acc = rec if self.acc is None else self.acc + rec
        return out.reshape(shape)

    def _balance(self, p: torch.Tensor) -> torch.Tensor:
        """[aux loss, mean routing entropy, 1 (a call), load per expert f_i (E)], fp32; only
        the aux loss carries a gradient."""
        E = self.cfg.experts
        k = self.cfg.top_k or 1
        chosen = p.topk(k, dim=-1).indices
        load = F.one_hot(chosen, E).float().sum(1).mean(0) / k  # f_i, sums to 1
        aux = E * (load * p.mean(0)).sum() * self.cfg.aux_loss_coef
        entropy = -(p * p.clamp_min(1e-20).log()).sum(-1).mean()
        return torch.cat([aux[None].float(), entropy[None].float().detach(),
                          torch.ones_like(entropy[None]).float(), load.detach()])

    def flops_per_token(self, seq_len: int) -> float:
        E = self.cfg.experts
        # hidden rows per token: one per expert once an expert modulates W1 or W3
        rows = E if ("w1" in self.experts or "w3" in self.experts) else 1
        up = self.w1.flops_per_token(seq_len) + self.w3.flops_per_token(seq_len)
        if type(self.w2) is DenseLinear:  # gate-mix the rows (a [1, E] x [E, h] product), then W2
            down = self.w2.flops_per_token(seq_len) + (6.0 * E * self.w2.in_features
                                                       if rows > 1 else 0.0)
        else:  # every row through W2, then the gate-mix of the outputs
            down = rows * self.w2.flops_per_token(seq_len) + 6.0 * E * self.ctx.dim
        router = 6.0 * self.ctx.dim * E
        # every expert's adapters run for every token (top-k is computed densely)
        lora = E * sum(f.flops_per_token() for f in self.experts.values())
        return up + down + router + lora

    def active_params(self) -> dict[str, float]:
        """A token's output depends on its top-k experts only (the others' gates are 0,
        though computed densely): k / E of the experts' factors."""
        share = (self.cfg.top_k or self.cfg.experts) / self.cfg.experts
        return {f"experts.{t}.{n}": share * p.numel()
                for t, f in self.experts.items() for n, p in f.named_parameters()}


def collect_aux(model: nn.Module) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The MoL auxiliary loss of the last training forward (summed over every MoL call: each
    layer, each loop; None without MoL) and the router statistics, as detached tensors (the
    caller decides when to sync): the aux loss, the mean routing entropy, the load of each
    expert (mean over calls) and the max load / ideal (1 = balanced). Clears them."""
    accs = []
    for m in model.modules():
        if isinstance(m, MoLFFN) and m.acc is not None:
            accs.append(m.acc)
            m.acc = None
    if not accs:
        return None, {}
    total = torch.stack(accs).sum(0)
    calls = total[2]
    load = total[3:].detach() / calls
    stats = {"mol_aux_loss": total[0].detach(), "mol_entropy": total[1] / calls,
             "mol_load_max": load.max() * load.numel()}
    stats.update({f"mol_load_{i}": v for i, v in enumerate(load.unbind())})
    return total[0], stats


def stats_to_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """The statistics as floats, with one host sync."""
    if not stats:
        return {}
    return dict(zip(stats, torch.stack([v.float() for v in stats.values()]).tolist()))


def clear_aux(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, MoLFFN):
            m.acc = None
