"""Kernels for the new layers. Each op lives in its own folder with a plain-PyTorch
`reference.py` beside the fast paths; the names exported here dispatch to the fastest
path available for the inputs' device."""

from __future__ import annotations

from typing import Any

# Lazy so that `import neotron.kernels` stays cheap and an op folder that is not needed
# is never imported (and never pulls an optional GPU dependency).
_EXPORTS = {
    "delta_rule": "neotron.kernels.delta_rule",
    "gated_delta_rule": "neotron.kernels.gated_delta_rule",
    "ttt_linear": "neotron.kernels.ttt",
    "ttt_mlp": "neotron.kernels.ttt",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neotron.kernels' has no attribute {name!r}")
