"""Split a state dict into its tensors (for DCP) and everything else (for JSON).

DCP would pickle a state dict's non-tensor leaves (the optimizer's `param_groups`: lr, betas,
parameter names, ...), and unpickling is what a crafted checkpoint abuses. So a checkpoint
keeps them as JSON instead: `split` separates the two, `to_json` / `from_json` encode the
non-tensor leaves (tuples tagged, so they come back as tuples), and `restore` writes saved
values back into a live state dict: only at paths that the live state already has, and only
plain JSON values, so a checkpoint's JSON can change a hyper-parameter but add nothing.
"""

from __future__ import annotations

import json
from typing import Any

import torch

Path_ = tuple[str | int, ...]
_SCALARS = (type(None), bool, int, float, str)
_TUPLE = "__tuple__"


def split(state: Any) -> tuple[dict[str, Any], dict[Path_, Any]]:
    """(tensors, plain): `tensors` is the nested dict of every tensor leaf (list indices
    become string keys, empty branches are dropped); `plain` maps the path of every other leaf
    to its value. Dicts and lists are walked; anything else is a leaf."""
    plain: dict[Path_, Any] = {}

    def walk(obj: Any, path: Path_) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj
        if isinstance(obj, dict | list):
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            branch = {}
            for key, value in items:
                sub = walk(value, (*path, key))
                if sub is not None:
                    branch[str(key)] = sub
            return branch or None
        _check_plain(obj, path)
        plain[path] = obj
        return None

    return walk(state, ()) or {}, plain


def _check_plain(value: Any, path: Path_) -> None:
    if isinstance(value, _SCALARS):
        return
    if isinstance(value, tuple | list):
        for i, v in enumerate(value):
            _check_plain(v, (*path, i))
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for k, v in value.items():
            _check_plain(v, (*path, k))
        return
    where = ".".join(map(str, path))
    raise TypeError(f"state entry {where} is a {type(value).__name__}: checkpoints keep"
                    " tensors and plain JSON values (None, bool, int, float, str, lists,"
                    " tuples, dicts) only")


def _encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE} and isinstance(value[_TUPLE], list):
            return tuple(_decode(v) for v in value[_TUPLE])
        return {k: _decode(v) for k, v in value.items()}
    return value


def to_json(plain: dict[Path_, Any]) -> str:
    leaves = [[list(path), _encode(value)] for path, value in plain.items()]
    return json.dumps({"leaves": leaves}, indent=1)


def from_json(text: str) -> dict[Path_, Any]:
    """The leaves of `to_json`'s output; ValueError if it is not that shape."""
    doc = json.loads(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("leaves"), list):
        raise ValueError("expected an object with a 'leaves' list")
    out: dict[Path_, Any] = {}
    for entry in doc["leaves"]:
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], list)
                or not all(isinstance(k, str | int) for k in entry[0])):
            raise ValueError(f"malformed entry {str(entry)[:80]}")
        out[tuple(entry[0])] = _decode(entry[1])
    return out


def restore(state: Any, saved: dict[Path_, Any], current: dict[Path_, Any]) -> None:
    """Write `saved[path]` into `state` for every path of `current` (the live state's plain
    leaves) that `saved` has."""
    for path, _ in current.items():
        if path not in saved:
            continue
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = saved[path]
