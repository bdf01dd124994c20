"""Whole-matrix orthogonalization for Muon/NorMuon when parameters live on several ranks.

Newton-Schulz must see whole matrices: the orthogonalization of a shard is not a shard of the
orthogonalization (Moonlight issue #27). Momentum, weight decay and the step itself are
elementwise and run on whatever each rank holds. This module moves the one non-elementwise
piece to an **owner rank** per matrix and back:

- **Sharded** (FSDP2: a ``DTensor`` on a 1-D mesh with placement ``Shard(0)``, rows split as
  ``torch.chunk`` splits them, possibly unevenly): every rank advances the momentum of its rows;
  one ``all_to_all`` per round sends each matrix's rows to its owner, which concatenates them,
  orthogonalizes the whole matrix (NorMuon: and normalizes its rows), and a second ``all_to_all``
  returns to every rank the rows of the update it holds. This is the scheme of microsoft/dion
  (``dion/muon.py``: "all-to-all communication is used to simultaneously unshard and distribute a
  batch of matrices"), written for neotron from its description, not copied.
- **Replicated** (DDP, or a ``DTensor`` placed ``Replicate()``): every rank has the whole
  gradient and advances the (replicated) momentum; the owner orthogonalizes, and one
  ``all_gather`` per round gives every rank the updates of all matrices of the round, as
  KellerJordan/Muon's round-robin ``all_gather`` does, so no rank repeats another's work.
- **Local** (a plain tensor and no process group, or a mesh of size 1): the whole matrix is here.

Owners are chosen by size (longest-processing-time greedy over the Newton-Schulz cost
``rows * cols * min(rows, cols)``), deterministically from the shapes alone, so every rank agrees
without communicating. A round holds up to ``comm_batch`` matrices per owner; the owner's
extra memory is the whole matrices of one round.

Wire formats are chosen so that the result is *identical* to the single-device optimizer:

- the Nesterov input goes to the owner in **bf16**: Newton-Schulz's first operation is a bf16
  cast, so the owner computes exactly what a single device computes from the fp32 input;
- Muon's update comes back in bf16 (Newton-Schulz returns bf16-representable numbers, so the
  cast is lossless); NorMuon's normalized update comes back in the parameter's dtype;
- row-wise state (NorMuon's per-row second moment ``v``, ``[rows, 1]``) is stored *sharded like
  the parameter's rows* (a ``DTensor`` ``Shard(0)`` over the same mesh, so DCP reshards it like
  any other state); its rows travel with the matrix to the owner, which updates the whole ``v``
  from whole rows (the single-device code, unchanged) and sends each rank its rows back.

All payloads of a round are packed into one ``uint8`` buffer per direction (each piece padded to
16 bytes so that it can be viewed back as its dtype without a copy), so a round costs exactly
two collectives whatever the dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "MatrixTask",
    "WIRE_DTYPE",
    "assign_owners",
    "chunk_rows",
    "layout_of",
    "local",
    "ns_cost",
    "row_state_like",
    "run_matrix_tasks",
]

# Newton-Schulz runs in bf16 and starts with a bf16 cast: sending its input in bf16 is lossless.
WIRE_DTYPE = torch.bfloat16
_ALIGN = 16


def _dtensor_cls() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def local(t: Tensor) -> Tensor:
    """The tensor this rank holds (``to_local()`` of a DTensor: a view, writes go through)."""
    DTensor = _dtensor_cls()
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def layout_of(p: Tensor, process_group: Any = None) -> tuple[str, Any]:
    """How ``p`` is laid out over ranks: ``("local"|"sharded"|"replicated", process_group)``.

    - a DTensor with ``Shard(0)`` on one mesh dim and ``Replicate()`` on the others (FSDP2 on
      a 1-D mesh; HSDP on a ``(replicate, shard)`` mesh): sharded over that dim's group. With
      HSDP every replica group does the same work on the same data, as FSDP2 itself does;
    - a DTensor replicated on a 1-D mesh: replicated over it;
    - a plain tensor: replicated over ``process_group`` (DDP) when given, else local;
    - any mesh dim of size 1 counts as not sharded.

    Raises ``NotImplementedError`` for layouts whose whole matrix this module cannot assemble
    (tensor parallel ``Shard(1)``, FSDP + TP, replicated over a multi-dim mesh).
    """
    DTensor = _dtensor_cls()
    if DTensor is not None and isinstance(p, DTensor):
        from torch.distributed.tensor import Replicate, Shard

        mesh = p.device_mesh
        placements = tuple(p.placements)
        split = [d for d, pl in enumerate(placements)
                 if not isinstance(pl, Replicate) and mesh.size(d) > 1]
        if not split:
            if all(mesh.size(d) == 1 for d in range(mesh.ndim)):
                return "local", None
            if mesh.ndim == 1 and all(isinstance(pl, Replicate) for pl in placements):
                return "replicated", mesh.get_group()
        elif len(split) == 1:
            (d,) = split
            pl = placements[d]
            if type(pl) is Shard and pl.dim == 0:
                return "sharded", mesh.get_group(d)
        raise NotImplementedError(
            f"Muon/NorMuon: DTensor placements {placements!r} on a mesh of shape "
            f"{tuple(mesh.shape)} are not supported: only Shard(0) on one mesh dim (FSDP2, HSDP) "
            "or Replicate() on a 1-D mesh; tensor-parallel shards along other dims would need "
            "their own gather."
        )
    if process_group is not None and dist.is_initialized():
        if dist.get_world_size(process_group) > 1:
            return "replicated", process_group
    return "local", None


def chunk_rows(rows: int, world: int) -> list[int]:
    """Rows of each rank when ``rows`` are split like ``torch.chunk`` (and DTensor ``Shard``)."""
    per = math.ceil(rows / world) if rows else 0
    return [max(0, min(per, rows - r * per)) for r in range(world)]


def ns_cost(shape: Sequence[int]) -> int:
    """Newton-Schulz work of a ``[rows, cols]`` matrix, up to a constant."""
    m, n = int(shape[-2]), int(shape[-1])
    return m * n * min(m, n)


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item: greedy longest-processing-time over ``costs``.

    Items are taken by decreasing cost (ties by index) and each goes to the least-loaded rank
    (ties by rank). Deterministic, so every rank computes the same answer from the shapes.
    """
    owners = [0] * len(costs)
    load = [0.0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda k: (load[k], k))
        owners[i] = r
        load[r] += costs[i]
    return owners


def row_state_like(p: Tensor, width: int = 1) -> Tensor:
    """Zeros of shape ``[rows, width]`` laid out like ``p``'s rows (a DTensor with ``p``'s
    mesh and placements when ``p`` is one), in ``p``'s dtype and device."""
    DTensor = _dtensor_cls()
    if DTensor is not None and isinstance(p, DTensor):
        rows_here = p.to_local().shape[0]
        zeros = torch.zeros((rows_here, width), dtype=p.dtype, device=p.to_local().device)
        return DTensor.from_local(
            zeros, p.device_mesh, p.placements, run_check=False,
            shape=torch.Size((p.shape[0], width)), stride=(width, 1),
        )
    return torch.zeros((p.shape[0], width), dtype=p.dtype, device=p.device)


@dataclass
class MatrixTask:
    """One matrix to update this step, as this rank sees it.

    ``u`` and ``rows`` are this rank's (rows of the) Nesterov input and row-wise states;
    ``direction`` is filled with this rank's rows of the update, in ``direction_dtype``.
    """

    shape: tuple[int, int]
    u: Tensor
    rows: dict[str, Tensor]
    group: dict[str, Any]
    param_dtype: torch.dtype
    direction_dtype: torch.dtype
    layout: str = "local"
    process_group: Any = None
    direction: Tensor | None = None
    owner: int | None = None  # group-local owner rank (None when local)
    extra: dict[str, Any] = field(default_factory=dict)


# compute(tasks, us, rows) -> directions: whole matrices in, whole updates out. ``rows`` are the
# whole row-wise states, updated in place by compute.
Compute = Callable[[list[MatrixTask], list[Tensor], list[dict[str, Tensor]]], list[Tensor]]


def run_matrix_tasks(tasks: list[MatrixTask], compute: Compute, *, comm_batch: int = 4) -> None:
    """Fill ``task.direction`` for every task, each whole matrix computed once, on its owner.

    Collective: every rank of a process group must call this with the same matrices of that
    group, in the same order (true for one optimizer's param groups under FSDP2/DDP).
    """
    if comm_batch < 1:
        raise ValueError(f"comm_batch must be >= 1, got {comm_batch}")
    local_tasks = [t for t in tasks if t.layout == "local"]
    if local_tasks:
        for t, d in zip(local_tasks, compute(local_tasks, [t.u for t in local_tasks],
                                             [t.rows for t in local_tasks])):
            t.direction = d.to(t.direction_dtype)
    # Bucket the distributed ones by (layout, process group), keeping first-seen order.
    buckets: dict[tuple[str, int], list[MatrixTask]] = {}
    for t in tasks:
        if t.layout != "local":
            buckets.setdefault((t.layout, id(t.process_group)), []).append(t)
    for (kind, _), ts in buckets.items():
        pg = ts[0].process_group
        world, me = dist.get_world_size(pg), dist.get_rank(pg)
        owners = assign_owners([ns_cost(t.shape) for t in ts], world)
        for t, o in zip(ts, owners):
            t.owner = o
        # Each owner's matrices, largest first; round k takes the k-th slice of every list, so
        # the matrices of a round are of similar size across owners.
        queues = [
            sorted((i for i in range(len(ts)) if owners[i] == r),
                   key=lambda i: (-ns_cost(ts[i].shape), i))
            for r in range(world)
        ]
        n_rounds = max((math.ceil(len(q) / comm_batch) for q in queues), default=0)
        for k in range(n_rounds):
            # Round members grouped by owner, owners in rank order: the packing order.
            members = [ts[i] for q in queues for i in q[k * comm_batch:(k + 1) * comm_batch]]
            if kind == "sharded":
                _sharded_round(members, compute, pg, world, me)
            else:
                _replicated_round(members, compute, pg, world, me)


# ----------------------------------------------------------------------------- packing


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _pack(parts: list[Tensor], device: torch.device) -> Tensor:
    total = sum(_padded(p.numel() * p.element_size()) for p in parts)
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    offset = 0
    for p in parts:
        n = p.numel() * p.element_size()
        if n:
            buf[offset:offset + n].copy_(p.contiguous().view(-1).view(torch.uint8))
        offset += _padded(n)
    return buf


class _Reader:
    """Reads typed pieces back from a packed uint8 buffer, in packing order."""

    def __init__(self, buf: Tensor) -> None:
        self.buf, self.offset = buf, 0

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        n = _nbytes(shape, dtype)
        piece = self.buf[self.offset:self.offset + n].view(dtype).view(*shape)
        self.offset += _padded(n)
        return piece


def _row_specs(t: MatrixTask) -> list[tuple[str, int, torch.dtype]]:
    """(name, width, dtype) of each row-wise state, in a fixed order (same on every rank)."""
    return [(name, v.shape[1], v.dtype) for name, v in sorted(t.rows.items())]


def _payload_bytes(t: MatrixTask, n_rows: int, first: torch.dtype) -> int:
    total = _padded(_nbytes((n_rows, t.shape[1]), first))
    for _, width, dtype in _row_specs(t):
        total += _padded(_nbytes((n_rows, width), dtype))
    return total


# ----------------------------------------------------------------------------- sharded (FSDP2)


def _sharded_round(members: list[MatrixTask], compute: Compute, pg: Any, world: int,
                   me: int) -> None:
    device = members[0].u.device
    splits = {id(t): chunk_rows(t.shape[0], world) for t in members}
    for t in members:
        if t.u.shape[0] != splits[id(t)][me]:
            raise RuntimeError(
                f"Muon: rank {me} holds {t.u.shape[0]} rows of a {t.shape} matrix, expected "
                f"{splits[id(t)][me]} (torch.chunk split): unsupported sharding"
            )
    mine = [t for t in members if t.owner == me]

    # 1. Rows to owners: [u rows (bf16), row-state rows...] per matrix, grouped by owner.
    send_parts: list[Tensor] = []
    in_splits = [0] * world
    for t in members:
        parts = [t.u.to(WIRE_DTYPE)] + [v for _, v in sorted(t.rows.items())]
        send_parts += parts
        in_splits[t.owner] += sum(_padded(p.numel() * p.element_size()) for p in parts)
    out_splits = [sum(_payload_bytes(t, splits[id(t)][s], WIRE_DTYPE) for t in mine)
                  for s in range(world)]
    recv = torch.empty(sum(out_splits), dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv, _pack(send_parts, device), out_splits, in_splits, group=pg)

    # 2. The owner assembles whole matrices (pieces arrive by source rank) and computes.
    reader = _Reader(recv)
    pieces_u: dict[int, list[Tensor]] = {id(t): [] for t in mine}
    pieces_rows: dict[int, dict[str, list[Tensor]]] = {
        id(t): {name: [] for name, _, _ in _row_specs(t)} for t in mine
    }
    for s in range(world):
        for t in mine:
            n = splits[id(t)][s]
            pieces_u[id(t)].append(reader.take((n, t.shape[1]), WIRE_DTYPE))
            for name, width, dtype in _row_specs(t):
                pieces_rows[id(t)][name].append(reader.take((n, width), dtype))
    us = [torch.cat(pieces_u[id(t)]) for t in mine]
    rows = [{name: torch.cat(ps) for name, ps in pieces_rows[id(t)].items()} for t in mine]
    directions = [d.to(t.direction_dtype) for t, d in zip(mine, compute(mine, us, rows))] if mine else []

    # 3. Each rank's rows of the update (and of the updated row states) back to it.
    send_parts = []
    in_splits = [0] * world
    for s in range(world):
        for t, d, r in zip(mine, directions, rows):
            lo = sum(splits[id(t)][:s])
            hi = lo + splits[id(t)][s]
            parts = [d[lo:hi]] + [v[lo:hi] for _, v in sorted(r.items())]
            send_parts += parts
            in_splits[s] += sum(_padded(p.numel() * p.element_size()) for p in parts)
    out_splits = [0] * world
    for t in members:
        out_splits[t.owner] += _payload_bytes(t, splits[id(t)][me], t.direction_dtype)
    recv = torch.empty(sum(out_splits), dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv, _pack(send_parts, device), out_splits, in_splits, group=pg)
    reader = _Reader(recv)
    for t in members:  # grouped by owner in rank order: the order the owners packed them
        n = splits[id(t)][me]
        t.direction = reader.take((n, t.shape[1]), t.direction_dtype)
        for name, width, dtype in _row_specs(t):
            t.rows[name].copy_(reader.take((n, width), dtype))


# ----------------------------------------------------------------------------- replicated (DDP)


def _replicated_round(members: list[MatrixTask], compute: Compute, pg: Any, world: int,
                      me: int) -> None:
    device = members[0].u.device
    mine = [t for t in members if t.owner == me]
    directions = ([d.to(t.direction_dtype)
                   for t, d in zip(mine, compute(mine, [t.u for t in mine], [t.rows for t in mine]))]
                  if mine else [])
    for t, d in zip(mine, directions):
        t.direction = d
    sizes = [sum(_payload_bytes(t, t.shape[0], t.direction_dtype) for t in members
                 if t.owner == r) for r in range(world)]
    width = max(sizes)
    if width == 0:
        return
    parts: list[Tensor] = []
    for t in mine:
        parts += [t.direction] + [v for _, v in sorted(t.rows.items())]
    payload = torch.zeros(width, dtype=torch.uint8, device=device)
    packed = _pack(parts, device)
    payload[:packed.numel()].copy_(packed)
    gathered = [torch.empty(width, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(gathered, payload, group=pg)
    for r in range(world):
        if r == me:
            continue
        reader = _Reader(gathered[r])
        for t in members:
            if t.owner != r:
                continue
            t.direction = reader.take(t.shape, t.direction_dtype)
            for name, w, dtype in _row_specs(t):
                t.rows[name].copy_(reader.take((t.shape[0], w), dtype))
