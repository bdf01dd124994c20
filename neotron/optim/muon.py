"""Muon: momentum + Newton-Schulz orthogonalization for hidden 2-D weight matrices.

References (re-implemented for neotron, not copied):
- K. Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024),
  https://kellerjordan.github.io/posts/muon/ ; code KellerJordan/Muon, muon.py.
- J. Liu et al., "Muon is Scalable for LLM Training" (Moonlight), arXiv 2502.16982: the
  0.2 * sqrt(max(rows, cols)) lr scale that lets AdamW's lr and weight decay carry over.
- torch.optim.Muon (torch/optim/_muon.py): same conventions as this file; a single-device
  :class:`Muon` step agrees with it bit for bit on CPU (tests/test_muon.py).

The math is split into functions so that the distributed optimizer can run the same code:
:func:`muon_momentum_` is elementwise (fine on any shard), :func:`~neotron.optim.newton_schulz.
zeropower_via_newtonschulz5` needs the *whole* matrix (run it on the owner rank after a gather),
and :func:`apply_update_` is elementwise again (fine on a shard after the scatter).
:func:`muon_update` is the first two for a whole matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from neotron.optim.newton_schulz import zeropower_via_newtonschulz5

__all__ = [
    "AdjustLR",
    "Muon",
    "apply_update_",
    "lr_scale",
    "muon_momentum_",
    "muon_update",
]

AdjustLR = Literal["original", "match_rms_adamw"]
_ADJUST_LR_CHOICES: tuple[str, ...] = get_args(AdjustLR)


def lr_scale(shape: Sequence[int], adjust_lr: AdjustLR) -> float:
    """Factor by which the group lr is multiplied for a matrix of ``shape`` (``[..., rows, cols]``).

    - ``"original"`` (Jordan): ``max(1, rows/cols) ** 0.5``. With S' ~ 1 the update then has
      spectral norm ~ sqrt(fan_out/fan_in) for tall matrices; lr is in "Muon units" (~0.02).
    - ``"match_rms_adamw"`` (Moonlight): ``0.2 * sqrt(max(rows, cols))``. An orthogonal
      ``rows x cols`` matrix has RMS ``1/sqrt(max(rows, cols))``, so the update's RMS is ~0.2,
      the typical RMS of an AdamW update: lr and weight decay tuned for AdamW (~1e-3, 0.1)
      carry over.

    Computed exactly as torch.optim.Muon computes it (same float operations).
    """
    rows, cols = int(shape[-2]), int(shape[-1])
    if adjust_lr == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr must be one of {_ADJUST_LR_CHOICES}, got {adjust_lr!r}")


def muon_momentum_(
    grad: Tensor, momentum_buf: Tensor, *, momentum: float, nesterov: bool
) -> Tensor:
    """Advance ``momentum_buf`` in place and return the matrix to orthogonalize.

    Convention (Jordan's code and torch.optim.Muon, read from torch/optim/_muon.py): the buffer
    is an EMA, ``B <- mu*B + (1-mu)*g`` (``lerp``), and the Nesterov input is
    ``(1-mu)*g + mu*B``. torch's *docstring* writes ``B <- mu*B + g``; that sum convention is
    the EMA times 1/(1-mu) and gives the same update after the scale-invariant orthogonalization
    (up to eps and bf16 rounding), but the code, which we match bit for bit, uses the EMA.

    Elementwise, so it runs on a shard as well as on a whole matrix. With ``nesterov=False``
    the returned tensor *is* ``momentum_buf``: do not modify it.
    """
    momentum_buf.lerp_(grad, 1 - momentum)
    return grad.lerp(momentum_buf, momentum) if nesterov else momentum_buf


def muon_update(
    grad: Tensor,
    momentum_buf: Tensor,
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    eps: float = 1e-7,
) -> Tensor:
    """One Muon update direction for a whole matrix (or a batch ``[..., m, n]`` of them).

    Advances ``momentum_buf`` in place (see :func:`muon_momentum_`) and returns
    ``NS5(u)``: orthogonalized, *not* yet scaled by the lr or :func:`lr_scale`, in ``grad``'s
    dtype. Needs the whole matrix: the orthogonalization of a shard is not a shard of the
    orthogonalization (Moonlight issue #27). The distributed optimizer gathers to an owner rank
    and calls this there.
    """
    update = muon_momentum_(grad, momentum_buf, momentum=momentum, nesterov=nesterov)
    return zeropower_via_newtonschulz5(update, steps=ns_steps, eps=eps)


def apply_update_(
    param: Tensor, update: Tensor, *, lr: float, weight_decay: float, scale: float
) -> None:
    """``W <- W * (1 - lr*wd) - lr*scale*update``, in place (elementwise: shard-safe).

    Weight decay is decoupled and uses the *unscaled* lr, as in torch.optim.Muon and Moonlight:
    with ``match_rms_adamw`` that is exactly AdamW's decoupled decay, so wd carries over too.
    """
    param.mul_(1 - lr * weight_decay)
    param.add_(update, alpha=-(lr * scale))


def _sharded_dtensor(p: Tensor) -> bool:
    """True for a DTensor sharded over more than one rank (FSDP2 / TP params)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return False
    mesh = p.device_mesh
    return any(pl.is_shard() and mesh.size(i) > 1 for i, pl in enumerate(p.placements))


class Muon(Optimizer):
    r"""Muon for 2-D hidden weight matrices, single device (or replicated params).

    Per parameter ``W`` of shape ``[rows, cols]`` with gradient ``g``::

        B <- mu*B + (1-mu)*g                      (EMA momentum, state["momentum_buffer"])
        u  = (1-mu)*g + mu*B if nesterov else B
        O  = NS5(u)                               (bf16 quintic Newton-Schulz, ~U S' V^T)
        W <- W*(1 - lr*weight_decay) - lr*lr_scale(W.shape, adjust_lr)*O

    This is torch.optim.Muon's update; with the same settings (``adjust_lr`` =
    torch's ``adjust_lr_fn``) the two agree bit for bit on CPU.

    **Learning-rate units depend on** ``adjust_lr``: ``"match_rms_adamw"`` (default) takes
    AdamW-sized lr and weight decay (lr ~1e-3, wd ~0.1; Moonlight); ``"original"`` takes Jordan's
    "Muon units" (lr ~0.02, wd ~0.0-0.01). Do not reuse one variant's lr with the other. Note
    torch.optim.Muon's own default is ``adjust_lr_fn=None`` = ``"original"``, with lr 1e-3:
    pass ``adjust_lr`` explicitly when comparing.

    Only 2-D parameters are accepted (a clear ``ValueError`` otherwise). Which matrices go
    here is the router's job (``neotron.optim.builder``): hidden linear weights go to Muon;
    embeddings, the LM head, norm gains, biases, gates and sparse tables go to AdamW, and a
    weight with more than 2 dims (conv kernels, per-head tensors) must be stored as 2-D by the
    model or sent to AdamW: Muon does not guess how to flatten it. FSDP-sharded parameters are rejected: orthogonalizing a
    shard is wrong; the distributed variant gathers whole matrices to an owner rank.

    State per parameter: ``{"momentum_buffer": Tensor}`` (param's shape and dtype), tensors
    only, so it checkpoints through ``torch.distributed.checkpoint`` like AdamW's.

    Args:
        params: 2-D tensors or param groups (per-group ``lr``, ``weight_decay``, ``momentum``,
            ``nesterov``, ``ns_steps``, ``eps``, ``adjust_lr`` are honored).
        lr: learning rate, in the units ``adjust_lr`` implies (default 1e-3).
        weight_decay: decoupled, ``W <- W*(1 - lr*wd)`` with the unscaled lr (default 0.1).
        momentum: EMA coefficient mu of the momentum buffer (default 0.95).
        nesterov: orthogonalize ``(1-mu)*g + mu*B`` instead of ``B`` (default True).
        ns_steps: Newton-Schulz iterations (default 5).
        eps: added to the Frobenius norm before Newton-Schulz normalizes by it (default 1e-7).
        adjust_lr: ``"match_rms_adamw"`` (default) or ``"original"``; see :func:`lr_scale`.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust_lr: AdjustLR = "match_rms_adamw",
        **extra_defaults: Any,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "eps": eps,
            "adjust_lr": adjust_lr,
            **extra_defaults,  # subclasses' hyperparameters (NorMuon's beta2, norm_eps)
        }
        super().__init__(params, defaults)

    # --- validation: done per group, so groups added later are checked as well ---

    def _validate_group(self, group: dict[str, Any]) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"{type(self).__name__}: {msg}")

        lr = float(group["lr"])
        check(lr >= 0.0, f"lr must be >= 0, got {lr}")
        check(
            group["weight_decay"] >= 0.0, f"weight_decay must be >= 0, got {group['weight_decay']}"
        )
        check(
            0.0 <= group["momentum"] < 1.0, f"momentum must be in [0, 1), got {group['momentum']}"
        )
        check(
            isinstance(group["nesterov"], bool),
            f"nesterov must be a bool, got {group['nesterov']!r}",
        )
        steps = group["ns_steps"]
        check(isinstance(steps, int) and steps >= 0, f"ns_steps must be an int >= 0, got {steps!r}")
        check(group["eps"] >= 0.0, f"eps must be >= 0, got {group['eps']}")
        check(
            group["adjust_lr"] in _ADJUST_LR_CHOICES,
            f"adjust_lr must be one of {_ADJUST_LR_CHOICES}, got {group['adjust_lr']!r}",
        )
        names = group.get("param_names")  # present when params were given as (name, tensor)
        for i, p in enumerate(group["params"]):
            where = f"parameter {names[i]!r}" if names else f"parameter #{i} of its group"
            if p.ndim != 2:
                raise ValueError(
                    f"{type(self).__name__} only optimizes 2-D weight matrices, but {where} has "
                    f"shape {tuple(p.shape)}. Send 0-/1-D params (norm gains, biases, scalars) "
                    "to AdamW; a weight with more dims (conv kernel, per-head tensor) must be "
                    "stored as 2-D [fan_out, fan_in] by the model or sent to AdamW by the router "
                    "(see docs/optimizers.md)."
                )
            if torch.is_complex(p):
                raise ValueError(f"{type(self).__name__} does not support complex {where}")
            if _sharded_dtensor(p):
                raise NotImplementedError(
                    f"{where} is a sharded DTensor {tuple(p.placements)}; single-device "
                    f"{type(self).__name__} would orthogonalize each shard on its own, which is "
                    "wrong. Use the distributed Muon (whole matrices gathered to an owner rank)."
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except (ValueError, NotImplementedError):
            self.param_groups.pop()  # leave the optimizer as it was before the bad group
            raise

    # --- the update: subclasses override the two hooks below ---

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _direction(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """The unscaled update direction for one parameter (advances its state)."""
        return muon_update(
            grad,
            state["momentum_buffer"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_steps=group["ns_steps"],
            eps=group["eps"],
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step for every parameter that has a gradient (others: no decay, no state)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])  # float() also accepts a 0-dim tensor lr
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                direction = self._direction(grad, state, group)
                apply_update_(
                    p,
                    direction,
                    lr=lr,
                    weight_decay=group["weight_decay"],
                    scale=lr_scale(p.shape, group["adjust_lr"]),
                )
        return loss
