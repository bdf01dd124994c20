"""Which parameter goes to which optimizer: routing rules, group settings, the printed table.

Every trainable parameter gets one **role** (first rule that applies):

1. an explicit tag, from its block: the module attribute ``_neotron_param_groups``
   (``{"weight": "sparse"}``: survives meta-device materialization and FSDP2, which both replace
   the Parameter objects), or the Parameter attribute ``_neotron_group`` (lost when the
   Parameter is replaced; set it again after ``to_empty`` and before ``fully_shard``);
2. ``embed``: the weight of an ``nn.Embedding``/``nn.EmbeddingBag`` (with tied embeddings this
   is also the LM head);
3. ``head``: a >= 2-D parameter of the model's output module (``head``, ``lm_head`` or
   ``output`` attribute of the model);
4. ``no_decay``: 0-D and 1-D parameters (norm gains, biases, scalar/vector gates, scales);
5. ``matrix``: the 2-D weight of a linear layer, i.e. of an ``nn.Linear`` or of any module
   exposing integer ``in_features`` and ``out_features`` (every ``make_linear`` layer): the
   hidden ``[fan_out, fan_in]`` matrices;
6. ``adamw``: everything else, with weight decay. That is 2-D parameters that are not a linear
   layer's weight (a depthwise conv kernel ``[channels, K]`` is ``channels`` filters, not a
   linear map, and orthogonalizing it would couple them; bare ``nn.Parameter`` tables), and
   every parameter with more than 2 dims (conv kernels, stacked per-head/per-expert weights):
   Muon does not guess how to flatten them. A block that wants Muon for such a weight stores
   it as a 2-D matrix and tags it ``"matrix"`` (Muon rejects a tagged >2-D parameter).

``lora`` is only ever a tag: the LoRA factors of relaxed recursion and of Mixture-of-LoRAs
(``neotron/arch/lora.py``, stored stacked as ``[n, r, in]`` / ``[n, out, r]``) go to AdamW with
no weight decay, never to Muon: orthogonalizing a rank-r factor sets all its singular values
equal, which from B = 0 turns the first update into a full-strength rank-r perturbation, and
decaying A and B separately penalizes the nuclear norm of B A (docs/recursion.md).

Roles and what they get (``cfg`` is :class:`neotron.config.OptimConfig`):

| role     | optimizer                              | lr                 | weight decay            |
|----------|----------------------------------------|--------------------|-------------------------|
| matrix   | ``cfg.name`` (muon, normuon, or adamw) | lr                 | weight_decay            |
| embed    | AdamW                                  | adamw_lr or lr     | 0                       |
| head     | AdamW                                  | adamw_lr or lr     | adamw_weight_decay      |
| no_decay | AdamW                                  | adamw_lr or lr     | 0                       |
| sparse   | AdamW                                  | sparse_lr or adamw | 0                       |
| lora     | AdamW                                  | adamw_lr or lr     | 0                       |
| adamw    | AdamW                                  | adamw_lr or lr     | adamw_weight_decay      |

A block may also override a parameter's weight decay with the module attribute
``_neotron_weight_decay`` (``{"values": 0.1}``: the product-key memory's
``value_weight_decay``). Such parameters keep their role's optimizer and lr and form their own
group, named ``<role>_wd<value>`` (e.g. ``sparse_wd0.1``); an override equal to the role's
weight decay changes nothing. Likewise the module attribute ``_neotron_lr_scale``
(``{"values": 4.0}``: UltraMemV2's value lr multiplier) multiplies a parameter's lr; such
parameters form their own group, named ``<group>_lr<scale>x`` (e.g. ``sparse_lr4x``). The
multiplier may also ramp linearly over training: ``(start, end, fraction)`` goes from ``start``
at step 0 to ``end`` at ``fraction`` of the run's steps and stays there (UltraMemV2's value lr,
4 -> 1); the group is named ``<group>_lr<start>to<end>x`` and carries ``lr_ramp``, which the
trainer applies on top of the schedule (``schedules.ramp_factor``).

Routing reads only module types, shapes and tags, so it runs on a meta-device model (``neotron
config`` prints the table without allocating anything) and on FSDP2/DTensor models alike.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from neotron.config import OptimConfig

__all__ = [
    "GROUP_ATTR",
    "MODULE_GROUPS_ATTR",
    "MODULE_WD_ATTR",
    "MODULE_LR_ATTR",
    "ROLES",
    "GroupPlan",
    "param_groups",
    "plan_groups",
    "route",
    "routing_table",
]

ROLES: tuple[str, ...] = ("matrix", "embed", "head", "no_decay", "sparse", "lora", "adamw")
GROUP_ATTR = "_neotron_group"  # on a Parameter
MODULE_GROUPS_ATTR = "_neotron_param_groups"  # on a module: {local param name: role}
MODULE_WD_ATTR = "_neotron_weight_decay"  # on a module: {local param name: weight decay}
MODULE_LR_ATTR = "_neotron_lr_scale"  # on a module: {local param name: multiplier or ramp}
LrRamp = tuple[float, float, float]  # lr multiplier (start, end, fraction of the run's steps)
_HEAD_ATTRS = ("head", "lm_head", "output")
# Wrapper segments that torch.compile, activation checkpointing and DDP add to parameter names.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter name without wrapper segments (``_orig_mod.`` and the like)."""
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ == "DistributedDataParallel":
            model = model.module  # type: ignore[assignment]
        else:
            return model


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
    )


class _Router:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        inner = _unwrap(model)
        self.head_ids: set[int] = set()
        for attr in _HEAD_ATTRS:
            mod = getattr(inner, attr, None)
            if isinstance(mod, nn.Module):
                self.head_ids |= {id(p) for p in mod.parameters() if p.ndim >= 2}

    def weight_decay(self, name: str) -> float | None:
        """The weight decay a block sets for this parameter, or None (its role's)."""
        prefix, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(prefix) if prefix else self.model
        wd = (getattr(module, MODULE_WD_ATTR, None) or {}).get(leaf)
        return None if wd is None else float(wd)

    def lr_scale(self, name: str) -> LrRamp:
        """The lr multiplier a block sets for this parameter, as (start, end, fraction): a
        constant multiplier x is (x, x, 1.0); the default is (1.0, 1.0, 1.0)."""
        prefix, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(prefix) if prefix else self.model
        scale = (getattr(module, MODULE_LR_ATTR, None) or {}).get(leaf, 1.0)
        if isinstance(scale, (int, float)):
            return (float(scale), float(scale), 1.0)
        start, end, fraction = scale
        return (float(start), float(end), float(fraction))

    def route(self, name: str, param: nn.Parameter) -> str:
        prefix, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(prefix) if prefix else self.model
        tag = getattr(param, GROUP_ATTR, None)
        if tag is None:
            tag = (getattr(module, MODULE_GROUPS_ATTR, None) or {}).get(leaf)
        if tag is not None:
            if tag not in ROLES:
                raise ValueError(
                    f"parameter {clean_name(name)!r} is tagged {tag!r}; a block may tag its "
                    f"parameters with one of {ROLES}"
                )
            return tag
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            return "embed"
        if id(param) in self.head_ids:
            return "head"
        if param.ndim < 2:
            return "no_decay"
        if param.ndim == 2 and _is_linear(module):
            return "matrix"
        return "adamw"


def route(name: str, param: nn.Parameter, model: nn.Module) -> str:
    """The role of one parameter of ``model`` (see the module docstring for the rules)."""
    return _Router(model).route(name, param)


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by role, in ``named_parameters`` order (roles in ``ROLES`` order)."""
    router = _Router(model)
    found: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            found.setdefault(router.route(name, p), []).append((name, p))
    return {role: found[role] for role in ROLES if role in found}


@dataclass
class GroupPlan:
    """One optimizer param group: its role, optimizer and settings, and its parameters."""

    name: str
    algorithm: str  # "muon", "normuon" or "adamw"
    lr: float
    weight_decay: float
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    lr_ramp: LrRamp | None = None  # a multiplier ramp on top of `lr` (which includes its start)


def group_settings(role: str, cfg: OptimConfig) -> tuple[str, float, float]:
    """(algorithm, peak lr, weight decay) of a role under ``cfg``."""
    adamw_lr = cfg.adamw_lr if cfg.adamw_lr is not None else cfg.lr
    adamw_wd = cfg.adamw_weight_decay if cfg.adamw_weight_decay is not None else cfg.weight_decay
    if role == "matrix":
        return cfg.name, cfg.lr, cfg.weight_decay
    if role in ("embed", "no_decay"):
        return "adamw", adamw_lr, 0.0
    if role == "sparse":
        return "adamw", cfg.sparse_lr if cfg.sparse_lr is not None else adamw_lr, 0.0
    if role == "lora":
        return "adamw", adamw_lr, 0.0
    if role in ("head", "adamw"):
        return "adamw", adamw_lr, adamw_wd
    raise ValueError(f"unknown role {role!r}")


def _by_weight_decay(
    router: _Router, role: str, members: list[tuple[str, nn.Parameter]], wd: float
) -> list[tuple[str, float, list[tuple[str, nn.Parameter]]]]:
    """A role's members split by block-set weight decay: (group name, wd, members), the role's
    own group first and named after the role."""
    split: dict[float, list[tuple[str, nn.Parameter]]] = {wd: []}
    for name, p in members:
        override = router.weight_decay(name)
        split.setdefault(wd if override is None else override, []).append((name, p))
    return [(role if w == wd else f"{role}_wd{w:g}", w, ms) for w, ms in split.items() if ms]


def _lr_group_name(group: str, ramp: LrRamp) -> str:
    start, end, _ = ramp
    if start == end:
        return group if start == 1.0 else f"{group}_lr{start:g}x"
    return f"{group}_lr{start:g}to{end:g}x"


def _by_lr_scale(
    router: _Router, group: str, members: list[tuple[str, nn.Parameter]]
) -> list[tuple[str, LrRamp, list[tuple[str, nn.Parameter]]]]:
    """A group's members split by block-set lr multiplier: (group name, (start, end, fraction),
    members), the unscaled ones first under the group's own name."""
    split: dict[LrRamp, list[tuple[str, nn.Parameter]]] = {(1.0, 1.0, 1.0): []}
    for name, p in members:
        split.setdefault(router.lr_scale(name), []).append((name, p))
    return [(_lr_group_name(group, r), r, ms) for r, ms in split.items() if ms]


def plan_groups(model: nn.Module, cfg: OptimConfig) -> list[GroupPlan]:
    """The param groups ``build_optimizer`` creates, hidden matrices first (the trainer logs
    the first group's lr)."""
    plans = []
    router = _Router(model)
    for role, members in param_groups(model).items():
        algorithm, lr, wd = group_settings(role, cfg)
        for name, w, ms in _by_weight_decay(router, role, members, wd):
            for group, ramp, part in _by_lr_scale(router, name, ms):
                plans.append(GroupPlan(group, algorithm, lr * ramp[0], w, part,
                                       lr_ramp=ramp if ramp[0] != ramp[1] else None))
    return plans


# Filled by build_optimizer so that routing_table(model) (called by the trainer without the
# config) can show each group's optimizer and settings.
_BUILT_WITH: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def remember_config(model: nn.Module, cfg: OptimConfig) -> None:
    try:
        _BUILT_WITH[model] = cfg
    except TypeError:
        pass


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", "." + clean_name(name) + ".").strip(".")


def _examples(members: list[tuple[str, nn.Parameter]], limit: int = 4) -> str:
    """Name patterns, layer indices as ``*`` and sibling modules braced:
    ``layers.*.mixer.{wq,wk,wv,wo}.weight``."""
    siblings: dict[tuple[str, str], list[str]] = {}
    for n, _ in members:
        parts = _pattern(n).split(".")
        key = (".".join(parts[:-2]), parts[-1]) if len(parts) >= 2 else ("", parts[-1])
        mid = parts[-2] if len(parts) >= 2 else ""
        names = siblings.setdefault(key, [])
        if mid not in names:
            names.append(mid)
    shown = []
    for (prefix, leaf), mids in siblings.items():
        mid = mids[0] if len(mids) == 1 else "{" + ",".join(mids) + "}"
        shown.append(".".join(x for x in (prefix, mid, leaf) if x))
    more = len(shown) - limit
    return ", ".join(shown[:limit]) + (f", ... (+{more} more)" if more > 0 else "")


def routing_table(model: nn.Module, cfg: OptimConfig | None = None) -> str:
    """A table: group -> optimizer, lr, weight decay, #tensors, #params, examples.

    Without ``cfg``, uses the config the model's optimizer was built with by
    ``build_optimizer`` (if any); otherwise shows only the routing.
    """
    cfg = cfg if cfg is not None else _BUILT_WITH.get(_unwrap(model), _BUILT_WITH.get(model))
    groups = param_groups(model)
    total = sum(p.numel() for members in groups.values() for _, p in members) or 1
    inner = _unwrap(model)
    tied = any(hasattr(inner, a) for a in _HEAD_ATTRS) and not _Router(model).head_ids
    lines = [f"{'group':<9} {'optimizer':<9} {'lr':>8} {'wd':>6} {'tensors':>7} "
             f"{'params':>13} {'share':>6}  examples"]
    router = _Router(model)
    for role, role_members in groups.items():
        algorithm, lr, role_wd = group_settings(role, cfg) if cfg is not None else ("-", 0.0, 0.0)
        for name, wd, members, (scale, _, _) in (
            (group, wd, part, ramp)
            for sub, wd, ms in _by_weight_decay(router, role, role_members, role_wd)
            for group, ramp, part in _by_lr_scale(router, sub, ms)
        ):
            n = sum(p.numel() for _, p in members)
            if cfg is not None:
                settings = f"{algorithm:<9} {lr * scale:>8.2e} {wd:>6.3g}"
            else:
                settings = f"{'-':<9} {'-':>8} {'-':>6}"
            note = " (tied: also the LM head)" if role == "embed" and tied else ""
            lines.append(f"{name:<9} {settings} {len(members):>7} {n:>13,} {n / total:>6.1%}  "
                         f"{_examples(members)}{note}")
    return "\n".join(lines)
