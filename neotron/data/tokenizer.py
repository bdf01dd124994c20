"""Byte-level BPE tokenizer: train on the training split, or load a tokenizer.json.

Training is deterministic: the `tokenizers` BPE trainer breaks ties between equal-count pairs by
the pair itself, so the same texts give a byte-identical tokenizer.json whatever the thread
count (checked by tests/test_data.py through the shard fingerprint).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from neotron.data.config import EOS_TOKEN
from neotron.data.errors import DataError, reason

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class LoadedTokenizer:
    """A `tokenizers.Tokenizer` with the facts the rest of neotron needs."""

    tokenizer: Tokenizer
    path: Path
    eos_token: str
    eos_id: int
    vocab_size: int  # including added special tokens: every id is < vocab_size
    sha256: str  # of the tokenizer.json bytes

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets we never use.
        fn = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in fn(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    eos_token: str = EOS_TOKEN,
    length: int | None = None,
) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE. Every byte is in the alphabet, so any text encodes
    and decodes back exactly; `eos_token` is the only special token (id 0)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def load_tokenizer(dir_or_path: str | Path, eos_token: str = EOS_TOKEN) -> LoadedTokenizer:
    """Load `<dir>/tokenizer.json` or a tokenizer.json file. Raises `DataError` (one line naming
    the file) if it is missing, unreadable, not a tokenizer, or lacks `eos_token`."""
    path = Path(dir_or_path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"no tokenizer at {path}; run `neotron prepare` first")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read tokenizer {path}: {reason(e)}") from e
    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # UnicodeDecodeError, or the tokenizers' parse error (an Exception)
        raise DataError(f"{path} is not a tokenizer.json: {reason(e)}") from e
    eos = tok.token_to_id(eos_token)
    if eos is None:
        raise DataError(
            f"tokenizer {path} has no token '{eos_token}' to end documents with; add it as a"
            " special token, or set data.tokenizer.eos_token to one of its tokens"
        )
    return LoadedTokenizer(
        tokenizer=tok,
        path=path,
        eos_token=eos_token,
        eos_id=eos,
        # max id + 1, not the token count: a hand-made tokenizer.json may leave gaps in its ids.
        vocab_size=max(tok.get_vocab(with_added_tokens=True).values()) + 1,
        sha256=hashlib.sha256(raw).hexdigest(),
    )
