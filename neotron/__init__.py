"""neotron: pretraining new LLM architectures at scale."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]

if TYPE_CHECKING:
    from neotron.hf.load import load_model


def __getattr__(name: str) -> Any:
    # Lazy: `import neotron` (the CLI, config validation) must not import torch or transformers.
    if name == "load_model":
        from neotron.hf.load import load_model

        return load_model
    raise AttributeError(f"module 'neotron' has no attribute {name!r}")
