"""Optimizers: Muon / NorMuon for hidden matrices, AdamW for the rest, routing, schedules.

`neotron.optim.builder.build_optimizer(model, cfg.optim)` is the entry point; see
docs/optimizers.md. Names are imported lazily, so that model code may import
`neotron.optim.routing` (for its constants) without an import cycle through the config.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_optimizer": "neotron.optim.builder",
    "Muon": "neotron.optim.muon",
    "NorMuon": "neotron.optim.normuon",
    "param_groups": "neotron.optim.routing",
    "route": "neotron.optim.routing",
    "routing_table": "neotron.optim.routing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neotron.optim' has no attribute {name!r}")
