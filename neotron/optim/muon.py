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

The :class:`Muon` optimizer runs that split for every layout: a whole matrix on one device, an
FSDP2 shard (rows gathered to an owner rank, :mod:`neotron.optim.distributed`), or a replicated
DDP parameter (one owner computes, everyone receives). It also carries AdamW param groups
(``group["algorithm"] == "adamw"``) so that one optimizer object, checkpointed by DCP like any
other, trains a whole model: Muon for the hidden matrices, AdamW for the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor
from torch.optim.adamw import adamw as functional_adamw
from torch.optim.optimizer import Optimizer, ParamsT

from neotron.optim.distributed import (
    WIRE_DTYPE,
    MatrixTask,
    layout_of,
    local,
    run_matrix_tasks,
)
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



class Muon(Optimizer):
    r"""Muon for 2-D hidden weight matrices, plus optional AdamW groups for everything else.

    Per matrix ``W`` of shape ``[rows, cols]`` with gradient ``g``::

        B <- mu*B + (1-mu)*g                      (EMA momentum, state["momentum_buffer"])
        u  = (1-mu)*g + mu*B if nesterov else B
        O  = NS5(u)                               (bf16 quintic Newton-Schulz, ~U S' V^T)
        W <- W*(1 - lr*weight_decay) - lr*lr_scale(W.shape, adjust_lr)*O

    This is torch.optim.Muon's update; with the same settings (``adjust_lr`` =
    torch's ``adjust_lr_fn``) the two agree bit for bit on CPU.

    **Layouts.** A parameter may be a plain tensor (single device), an FSDP2 ``DTensor`` sharded
    ``Shard(0)`` on a 1-D mesh (each matrix is gathered whole to one owner rank, orthogonalized
    there, and its rows sent back; see :mod:`neotron.optim.distributed`), a ``Replicate()``
    DTensor, or a plain tensor replicated by DDP when ``process_group`` is given (the owner
    orthogonalizes, the others receive the update). Every layout computes exactly what the
    single-device optimizer computes on the whole matrix; under a process group every rank must
    call :meth:`step` (it is collective). Other placements (tensor parallel, 2-D meshes) raise
    ``NotImplementedError`` when the group is added.

    **AdamW groups.** A param group with ``"algorithm": "adamw"`` is stepped by torch's
    functional AdamW (the same code as ``torch.optim.AdamW``, decoupled weight decay, state
    ``step``/``exp_avg``/``exp_avg_sq``) with its own ``lr``, ``betas``, ``eps`` (default
    ``adamw_betas``/``adamw_eps``, *not* Muon's Newton-Schulz eps) and ``weight_decay``. Any
    shape is accepted there. ``neotron.optim.builder.build_optimizer`` routes a model's
    parameters into such groups.

    **Learning-rate units depend on** ``adjust_lr``: ``"match_rms_adamw"`` (default) takes
    AdamW-sized lr and weight decay (lr ~1e-3, wd ~0.1; Moonlight); ``"original"`` takes Jordan's
    "Muon units" (lr ~0.02, wd ~0.0-0.01). Do not reuse one variant's lr with the other. Note
    torch.optim.Muon's own default is ``adjust_lr_fn=None`` = ``"original"``, with lr 1e-3:
    pass ``adjust_lr`` explicitly when comparing.

    Only 2-D parameters are accepted in the Muon groups (a clear ``ValueError`` otherwise);
    embeddings, the LM head, norm gains, biases, gates and sparse tables belong in AdamW groups,
    and a weight with more than 2 dims must be stored as 2-D by the model or sent to AdamW: Muon
    does not guess how to flatten it.

    State per matrix: ``{"momentum_buffer": Tensor}`` (param's shape, dtype and layout), tensors
    only, so it checkpoints and reshards through ``torch.distributed.checkpoint`` like AdamW's.

    Args:
        params: tensors or param groups (per-group ``lr``, ``weight_decay``, ``momentum``,
            ``nesterov``, ``ns_steps``, ``eps``, ``adjust_lr``, ``algorithm`` are honored).
        lr: learning rate, in the units ``adjust_lr`` implies (default 1e-3).
        weight_decay: decoupled, ``W <- W*(1 - lr*wd)`` with the unscaled lr (default 0.1).
        momentum: EMA coefficient mu of the momentum buffer (default 0.95).
        nesterov: orthogonalize ``(1-mu)*g + mu*B`` instead of ``B`` (default True).
        ns_steps: Newton-Schulz iterations (default 5).
        eps: added to the Frobenius norm before Newton-Schulz normalizes by it (default 1e-7).
        adjust_lr: ``"match_rms_adamw"`` (default) or ``"original"``; see :func:`lr_scale`.
        adamw_betas, adamw_eps: defaults of the AdamW groups (0.9, 0.95) and 1e-8.
        process_group: the data-parallel group over which *plain-tensor* parameters are
            replicated (DDP). ``None``: plain tensors are local. DTensor parameters always use
            their own mesh.
        comm_batch: matrices per owner rank per communication round (default 4): fewer rounds,
            more memory on the owner (whole matrices of one round).
        batch_ns: orthogonalize same-shape matrices in one batched call (default: on CUDA only;
            on CPU a loop keeps torch.optim.Muon's exact op sequence).
    """

    matrix_algorithm: ClassVar[str] = "muon"
    # Row-wise state (shape [rows, k]) that must travel with the whole matrix to its owner.
    row_states: ClassVar[tuple[str, ...]] = ()

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
        *,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        process_group: Any = None,
        comm_batch: int = 4,
        batch_ns: bool | None = None,
        **extra_defaults: Any,
    ) -> None:
        # Set before super().__init__, which calls add_param_group.
        self._adamw_defaults: dict[str, Any] = {"betas": tuple(adamw_betas), "eps": adamw_eps}
        self.process_group = process_group
        if comm_batch < 1:
            raise ValueError(f"{type(self).__name__}: comm_batch must be >= 1, got {comm_batch}")
        self.comm_batch = comm_batch
        self.batch_ns = batch_ns
        # (global shape, owner rank or None when local) of each matrix of the last step.
        self.last_step_owners: list[tuple[tuple[int, int], int | None]] = []
        defaults: dict[str, Any] = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "eps": eps,
            "adjust_lr": adjust_lr,
            "algorithm": self.matrix_algorithm,
            **extra_defaults,  # subclasses' hyperparameters (NorMuon's beta2, norm_eps)
        }
        super().__init__(params, defaults)

    # --- validation: done per group, so groups added later are checked as well ---

    def _validate_group(self, group: dict[str, Any]) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"{type(self).__name__}: {msg}")

        algorithms = (self.matrix_algorithm, "adamw")
        check(
            group["algorithm"] in algorithms,
            f"algorithm must be one of {algorithms}, got {group['algorithm']!r}",
        )
        lr = float(group["lr"])
        check(lr >= 0.0, f"lr must be >= 0, got {lr}")
        check(
            group["weight_decay"] >= 0.0, f"weight_decay must be >= 0, got {group['weight_decay']}"
        )
        if group["algorithm"] == "adamw":
            betas = group["betas"]
            check(
                len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
                f"AdamW betas must be two numbers in [0, 1), got {betas!r}",
            )
            check(group["eps"] > 0.0, f"AdamW eps must be > 0, got {group['eps']}")
            return
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
            try:
                layout_of(p, self.process_group)
            except NotImplementedError as e:
                raise NotImplementedError(f"{where}: {e}") from None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("algorithm") == "adamw":
            param_group = {**self._adamw_defaults, **param_group}
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except (ValueError, NotImplementedError):
            self.param_groups.pop()  # leave the optimizer as it was before the bad group
            raise

    # --- hooks that NorMuon overrides ---

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        """Create the missing state of a matrix (laid out like ``p``: DTensor if ``p`` is)."""
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _direction_dtype(self, p: Tensor, layout: str) -> torch.dtype:
        """Dtype in which the update travels back from the owner. Newton-Schulz returns bf16
        numbers, so Muon's update is sent in bf16 without loss."""
        return p.dtype if layout == "local" else WIRE_DTYPE

    def _finish(
        self, ortho: Tensor, rows: dict[str, Tensor], group: dict[str, Any], param_dtype: torch.dtype
    ) -> Tensor:
        """Whole-matrix post-processing of the orthogonalized update (NorMuon: normalization)."""
        return ortho

    # --- the update ---

    def _orthogonalize(self, tasks: list[MatrixTask], us: list[Tensor]) -> list[Tensor]:
        """NS5 of each whole matrix ``us[i]``; same-shape ones batched if ``batch_ns``."""
        batch = self.batch_ns if self.batch_ns is not None else any(u.is_cuda for u in us)
        out: list[Tensor | None] = [None] * len(us)
        if not batch:
            for i, (t, u) in enumerate(zip(tasks, us)):
                out[i] = zeropower_via_newtonschulz5(u, steps=t.group["ns_steps"], eps=t.group["eps"])
            return out  # type: ignore[return-value]
        buckets: dict[tuple[Any, ...], list[int]] = {}
        for i, (t, u) in enumerate(zip(tasks, us)):
            key = (tuple(u.shape), u.dtype, t.group["ns_steps"], t.group["eps"])
            buckets.setdefault(key, []).append(i)
        for (_, _, steps, eps), idx in buckets.items():
            result = zeropower_via_newtonschulz5(torch.stack([us[i] for i in idx]), steps=steps, eps=eps)
            for j, i in enumerate(idx):
                out[i] = result[j]
        return out  # type: ignore[return-value]

    def _compute(
        self, tasks: list[MatrixTask], us: list[Tensor], rows: list[dict[str, Tensor]]
    ) -> list[Tensor]:
        orthos = self._orthogonalize(tasks, us)
        return [self._finish(o, r, t.group, t.param_dtype) for o, r, t in zip(orthos, rows, tasks)]

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} (AdamW group) does not support sparse gradients")
            state = self.state[p]
            if "exp_avg" not in state:  # the state torch.optim.AdamW keeps, same dtypes
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        # foreach only on CUDA: on CPU the single-tensor path is what torch.optim.AdamW(
        # foreach=False) runs, bit for bit, which exact resume relies on.
        functional_adamw(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=all(p.is_cuda for p in params), capturable=False, differentiable=False,
            fused=None, grad_scale=None, found_inf=None,
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step for every parameter that has a gradient (others: no decay, no state).

        Collective when parameters are sharded or replicated over ranks.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        tasks: list[MatrixTask] = []
        params: list[Tensor] = []
        for group in self.param_groups:
            if group["algorithm"] == "adamw":
                self._adamw_step(group)
                continue
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                self._init_state(p, state)
                layout, pg = layout_of(p, self.process_group)
                # Elementwise, on this rank's rows (the whole matrix when not sharded).
                u = muon_momentum_(
                    local(grad), local(state["momentum_buffer"]),
                    momentum=group["momentum"], nesterov=group["nesterov"],
                )
                tasks.append(MatrixTask(
                    shape=(int(p.shape[0]), int(p.shape[1])), u=u,
                    rows={name: local(state[name]) for name in self.row_states},
                    group=group, param_dtype=p.dtype,
                    direction_dtype=self._direction_dtype(p, layout),
                    layout=layout, process_group=pg,
                ))
                params.append(p)
        if tasks:
            run_matrix_tasks(tasks, self._compute, comm_batch=self.comm_batch)
            for p, t in zip(params, tasks):
                assert t.direction is not None
                apply_update_(
                    local(p), t.direction.to(p.dtype), lr=float(t.group["lr"]),
                    weight_decay=t.group["weight_decay"],
                    scale=lr_scale(t.shape, t.group["adjust_lr"]),
                )
        self.last_step_owners = [(t.shape, t.owner) for t in tasks]
        return loss
