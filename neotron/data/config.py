"""The `data:` section of a run config: where text comes from, how it is tokenized and split.

Kept free of heavy imports (no torch, datasets or tokenizers) because `neotron.config` imports it
just to validate a YAML file.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from neotron.strict import StrictModel

# File suffix -> the HF `datasets` builder that reads it. A .txt file is one document; the
# other formats hold one document per row, its text in `text_key`.
FILE_FORMATS: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}

EOS_TOKEN = "<|endoftext|>"

# 64 Mi tokens: 128 MiB per uint16 shard. Bounded so that a big corpus is many files, not one.
DEFAULT_SHARD_TOKENS = 64 * 2**20


class TokenizerConfig(StrictModel):
    """Load an existing tokenizer.json (`path`), or train a byte-level BPE on the train split."""

    path: str | None = None
    # 256 byte symbols + the EOS token is the smallest byte-level BPE there is.
    vocab_size: int = Field(4096, ge=257)
    min_frequency: int = Field(2, ge=1)
    eos_token: str = EOS_TOKEN

    @model_validator(mode="after")
    def _check_path(self) -> TokenizerConfig:
        if self.path is not None and not Path(self.path).expanduser().is_file():
            raise ValueError(f"@path: tokenizer file not found: '{self.path}'")
        return self


class DataConfig(StrictModel):
    """Text source, tokenizer, split and sequence length of a run."""

    source: Literal["shakespeare", "files", "hf"] = "shakespeare"
    # source=files: files or globs (relative to the current directory). .txt/.text/.md: one
    # document per file; .jsonl/.json/.parquet: one document per row, text in `text_key`.
    paths: list[str] = []
    # source=hf: a dataset on the Hugging Face Hub (needs network, or a warm HF cache).
    hf_name: str | None = None
    hf_config: str | None = None
    hf_revision: str | None = None
    hf_split: str = "train"
    text_key: str = "text"
    # Where tokenizer.json, index.json and the shards go. Default: .neotron/data/<source...>.
    dir: str = ".neotron/data/shakespeare"
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    seq_len: int = Field(256, gt=0)
    # Fraction of the text held out for validation: whole plays for shakespeare, whole
    # documents (chosen by a hash of their text) for files/hf.
    val_fraction: float = Field(0.05, gt=0.0, le=0.5)
    shard_tokens: int = Field(DEFAULT_SHARD_TOKENS, gt=0)
    # Keep the documents packed into one row apart: attention is masked across the EOS that
    # ends each document, recurrent state is reset there and positions restart (the trainer's
    # `forward` passes SeqInfo.for_tokens(tokens, eos); docs/mixers.md). The shards are the same.
    document_masking: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_dir(cls, data: Any) -> Any:
        # Different sources get different default directories, so switching `source` does not
        # throw away the other source's prepared shards.
        if isinstance(data, dict) and data.get("dir") is None:
            data = dict(data)
            data["dir"] = default_dir(data.get("source", "shakespeare"), data.get("hf_name"))
        return data

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.source == "files":
            if not self.paths:
                raise ValueError("@paths: source 'files' needs at least one file or glob")
            expand_paths(self.paths)  # raises naming the first path that matches nothing
        elif self.source == "hf" and not self.hf_name:
            raise ValueError("@hf_name: required when source is 'hf'")
        return self


def default_dir(source: str, hf_name: str | None = None) -> str:
    if source == "hf" and hf_name:
        return f".neotron/data/hf/{hf_name.replace('/', '__')}"
    return f".neotron/data/{source}"


def expand_paths(paths: list[str]) -> list[Path]:
    """Expand files/globs in order (each glob sorted), dropping repeats.

    Raises ValueError naming the first entry that matches no file or has an unknown suffix.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for entry in paths:
        pattern = os.path.expanduser(entry)
        if any(c in pattern for c in "*?["):
            hits = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        else:
            hits = [pattern] if os.path.isfile(pattern) else []
        if not hits:
            hint = (
                " (it is a directory; use a glob such as 'dir/*.txt')"
                if os.path.isdir(pattern)
                else ""
            )
            raise ValueError(f"@paths: no file matches '{entry}'{hint}")
        for hit in hits:
            path = Path(hit).resolve()
            if file_format(path) is None:
                raise ValueError(
                    f"@paths: '{hit}' has an unsupported suffix; supported: "
                    + ", ".join(FILE_FORMATS)
                )
            if path not in seen:
                seen.add(path)
                out.append(path)
    return out


def file_format(path: Path) -> str | None:
    return FILE_FORMATS.get(path.suffix.lower())
