"""Data pipeline: corpus -> tokenizer -> packed token shards -> globally ordered batches.

Names are imported lazily: `neotron.config` imports `neotron.data.config`, and validating a
YAML file should not pay for importing torch, tokenizers or datasets. The `prepare` function
is not re-exported here because `neotron.data.prepare` is also the name of its module; use
`from neotron.data.prepare import prepare`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "neotron.data.config",
    "DataError": "neotron.data.errors",
    "TokenizerConfig": "neotron.data.config",
    "shakespeare_documents": "neotron.data.corpus",
    "open_corpus": "neotron.data.corpus",
    "LoadedTokenizer": "neotron.data.tokenizer",
    "load_tokenizer": "neotron.data.tokenizer",
    "train_bpe": "neotron.data.tokenizer",
    "ShardSet": "neotron.data.shards",
    "token_dtype": "neotron.data.shards",
    "PreparedData": "neotron.data.prepare",
    "open_prepared": "neotron.data.prepare",
    "TokenLoader": "neotron.data.loader",
    "ValLoader": "neotron.data.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neotron.data' has no attribute '{name}'")
