"""NorMuon: Muon followed by neuron-wise (per output row) adaptive normalization.

Reference (re-implemented for neotron, not copied): Z. Li, L. Liu, C. Liang, W. Chen, T. Zhao,
"NorMuon: Making Muon more efficient and scalable", arXiv 2510.05491; official single-file code
zichongli5/NorMuon (normuon.py, commit d45c9a4280), whose conventions are kept here: beta2 = 0.95,
no bias correction, a Frobenius rescale back to the orthogonalized update's norm, then Muon's
lr scale. Distributed reference: microsoft/dion, dion/normuon.py.

Like :mod:`neotron.optim.muon`, the math is a function (:func:`neuron_normalize_`) on whole
matrices or batches of them, so the distributed optimizer can call it on the owner rank.

Distributed choice (documented in docs/optimizers.md): the per-row second moment ``v`` is
stored sharded exactly like the parameter's rows (FSDP2: a ``Shard(0)`` DTensor ``[rows, 1]``);
its rows travel with the matrix to the owner rank, which runs :func:`neuron_normalize_` on the
whole matrix (whole rows for ``v``, the whole matrix for the Frobenius rescale) and returns each
rank its rows of the update and of ``v``. The result is the single-device one, bit for bit, and
the state reshards through DCP like any row-sharded tensor.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from neotron.optim.distributed import row_state_like
from neotron.optim.muon import AdjustLR, Muon, muon_update

__all__ = ["NorMuon", "neuron_normalize_", "normuon_update"]


def neuron_normalize_(
    update: Tensor, second_momentum: Tensor, *, beta2: float = 0.95, eps: float = 1e-10
) -> Tensor:
    """Row-normalize an orthogonalized update; advances ``second_momentum`` in place.

    For ``O`` of shape ``[..., rows, cols]`` and ``v`` (``second_momentum``) of shape
    ``[..., rows, 1]``::

        v  <- beta2*v + (1-beta2) * mean_over_cols(O*O)     (one EMA per output neuron)
        O' =  O / (sqrt(v) + eps)
        O' *= ||O||_F / ||O'||_F                            (per matrix)

    No bias correction, as in the official code. (It would not matter away from eps anyway:
    dividing v by (1 - beta2^t) scales every row of O' by the same factor, which the Frobenius
    rescale then removes.) The rescale keeps the update's overall size that of Muon's, so
    NorMuon uses Muon's lr scales and lr units; only the distribution across rows changes.

    Computed in float32 (the official code, since its "fix-bf16" change, does it in the NS
    output dtype, bf16); ``v`` keeps its own dtype (the param's). Returns ``update``'s dtype.
    Needs whole rows and, for the rescale, the whole matrix.
    """
    if update.ndim < 2 or second_momentum.shape != (*update.shape[:-1], 1):
        raise ValueError(
            f"second_momentum must have shape [..., rows, 1] = {(*update.shape[:-1], 1)} for an "
            f"update of shape {tuple(update.shape)}, got {tuple(second_momentum.shape)}"
        )
    o = update.float()
    row_mean_sq = o.square().mean(dim=-1, keepdim=True)
    second_momentum.lerp_(row_mean_sq.to(second_momentum.dtype), 1 - beta2)
    normalized = o / (second_momentum.float().sqrt() + eps)
    # Rescale to the pre-normalization Frobenius norm. clamp_min only guards 0/0 for an all-zero
    # update (then both norms are 0 and the result stays 0).
    ratio = o.norm(dim=(-2, -1), keepdim=True) / normalized.norm(
        dim=(-2, -1), keepdim=True
    ).clamp_min(eps)
    return (normalized * ratio).to(update.dtype)


def normuon_update(
    grad: Tensor,
    momentum_buf: Tensor,
    second_momentum: Tensor,
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    eps: float = 1e-7,
    beta2: float = 0.95,
    norm_eps: float = 1e-10,
) -> Tensor:
    """:func:`~neotron.optim.muon.muon_update` then :func:`neuron_normalize_`, on a whole matrix.

    Advances both buffers in place; returns the update direction before the lr and lr scale.
    """
    orthogonalized = muon_update(
        grad, momentum_buf, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, eps=eps
    )
    return neuron_normalize_(orthogonalized, second_momentum, beta2=beta2, eps=norm_eps)


class NorMuon(Muon):
    r"""NorMuon for 2-D hidden weight matrices (plus optional AdamW groups, as :class:`Muon`).

    Per parameter ``W`` ``[rows, cols]``: Muon's momentum and orthogonalization
    (see :class:`~neotron.optim.muon.Muon`), then per output row ``i``::

        v_i <- beta2*v_i + (1-beta2) * mean_j O_ij^2      (state["second_momentum"], [rows, 1])
        O'   = O / (sqrt(v) + norm_eps),   O' *= ||O||_F / ||O'||_F
        W   <- W*(1 - lr*weight_decay) - lr*lr_scale(W.shape, adjust_lr)*O'

    **Learning-rate units** are Muon's, set by ``adjust_lr``, because the Frobenius rescale gives
    O' the norm of O: ``"match_rms_adamw"`` (default) takes AdamW-sized lr/wd (~1e-3 / 0.1);
    ``"original"`` takes Muon units (~0.02) and is what the official NorMuon code does (its
    default lr is 0.02). The paper's Algorithm 1 instead writes an exact-RMS scale
    ``0.2*lr*sqrt(rows*cols)/||O'||_F``; ``"match_rms_adamw"`` equals it when
    ``||O||_F = sqrt(min(rows, cols))``, i.e. up to the Newton-Schulz band S'.

    State per parameter: ``{"momentum_buffer": [rows, cols], "second_momentum": [rows, 1]}``,
    both in the param's dtype and laid out like the param's rows (sharded by FSDP2 like it);
    tensors only. Distributed: ``v``'s rows go to the owner with the matrix (module docstring).

    Args: as :class:`~neotron.optim.muon.Muon`, plus
        beta2: EMA coefficient of the per-row second moment (default 0.95).
        norm_eps: added to sqrt(v) (default 1e-10, as in the official code).
    """

    matrix_algorithm: ClassVar[str] = "normuon"
    row_states: ClassVar[tuple[str, ...]] = ("second_momentum",)

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
        beta2: float = 0.95,
        norm_eps: float = 1e-10,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            eps=eps,
            adjust_lr=adjust_lr,
            beta2=beta2,
            norm_eps=norm_eps,
            **kwargs,  # adamw_betas, adamw_eps, process_group, comm_batch, batch_ns
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if group["algorithm"] == "adamw":
            return
        if not 0.0 <= group["beta2"] < 1.0:
            raise ValueError(f"NorMuon: beta2 must be in [0, 1), got {group['beta2']}")
        if not group["norm_eps"] > 0.0:
            raise ValueError(f"NorMuon: norm_eps must be > 0, got {group['norm_eps']}")

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        super()._init_state(p, state)
        if "second_momentum" not in state:
            state["second_momentum"] = row_state_like(p, 1)

    def _direction_dtype(self, p: Tensor, layout: str) -> torch.dtype:
        return p.dtype  # the normalized update is not bf16-exact: send it in the param's dtype

    def _finish(
        self, ortho: Tensor, rows: dict[str, Tensor], group: dict[str, Any],
        param_dtype: torch.dtype,
    ) -> Tensor:
        # In the param's dtype, as on a single device where NS returns the (fp32) grad's dtype.
        return neuron_normalize_(
            ortho.to(param_dtype), rows["second_momentum"], beta2=group["beta2"],
            eps=group["norm_eps"],
        )
