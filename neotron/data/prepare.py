"""Text -> tokenizer -> packed token shards, written atomically and reused when unchanged.

Layout of `cfg.dir`:

    tokenizer.json
    train/train_000000.bin ...
    val/val_000000.bin ...
    index.json          written last: its presence means the dataset is complete

Everything is built in `<dir>/.staging-*` and moved into place; the old `index.json` is removed
before the old files are replaced and the new one is moved in after them, so a crash at any
instant leaves either a complete dataset or one without an index (which the next `prepare`
rebuilds), never a half-written one that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from neotron.data.config import DataConfig
from neotron.data.corpus import Corpus, corpus_identity, open_corpus
from neotron.data.shards import (
    ShardInfo,
    ShardSet,
    ShardWriter,
    dtype_from_name,
    dtype_name,
    token_dtype,
)
from neotron.data.tokenizer import TOKENIZER_FILE, LoadedTokenizer, load_tokenizer, train_bpe

log = logging.getLogger("neotron.data")

# Bump when the shard layout or the tokenization code changes meaning: old shards are rebuilt.
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SPLITS = ("train", "val")


@dataclass
class PreparedData:
    """A prepared dataset directory, opened read-only."""

    dir: Path
    index: dict[str, Any]
    train: ShardSet
    val: ShardSet
    reused: bool  # True when prepare() found matching shards and wrote nothing

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return self.index["tokenizer"]["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.index["tokenizer"]["eos_id"]

    @property
    def dtype(self) -> np.dtype:
        return dtype_from_name(self.index["dtype"])

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / TOKENIZER_FILE

    def tokenizer(self) -> LoadedTokenizer:
        return load_tokenizer(self.tokenizer_path, self.index["tokenizer"]["eos_token"])

    def split(self, name: str) -> ShardSet:
        return {"train": self.train, "val": self.val}[name]


# ---------------------------------------------------------------- keys


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def prepare_settings(cfg: DataConfig) -> dict[str, Any]:
    """Everything the shard bytes depend on. seq_len and document_masking are not in it: they
    change how shards are read, not what they hold."""
    tk = cfg.tokenizer
    if tk.path is not None:
        tokenizer: dict[str, Any] = {
            "file_sha256": hashlib.sha256(Path(tk.path).expanduser().read_bytes()).hexdigest()
        }
    else:
        tokenizer = {"train_bpe": {"vocab_size": tk.vocab_size, "min_frequency": tk.min_frequency}}
    tokenizer["eos_token"] = tk.eos_token
    return {
        "format_version": FORMAT_VERSION,
        "corpus": corpus_identity(cfg),
        "val_fraction": cfg.val_fraction,
        "tokenizer": tokenizer,
        "shard_tokens": cfg.shard_tokens,
    }


def inputs_hash(cfg: DataConfig) -> str:
    """Key for reuse: same inputs and settings => same hash => the shards on disk are kept."""
    return _sha256_json(prepare_settings(cfg))


# ---------------------------------------------------------------- opening


def open_prepared(directory: str | Path) -> PreparedData:
    """Open a prepared dataset. Raises FileNotFoundError if it is missing or incomplete."""
    root = Path(directory)
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"no prepared dataset at {root} (no {INDEX_FILE}); run prepare")
    index = json.loads(index_path.read_text())
    dtype = dtype_from_name(index["dtype"])
    sets = {}
    for split in SPLITS:
        info = index["splits"][split]
        shards = [ShardInfo(s["file"], s["tokens"]) for s in info["shards"]]
        for s in shards:
            path = root / split / s.file
            if not path.is_file() or path.stat().st_size != s.tokens * dtype.itemsize:
                raise FileNotFoundError(f"{path} is missing or has the wrong size; re-run prepare")
        sets[split] = ShardSet(
            root / split,
            shards,
            dtype,
            fingerprint=index["fingerprint"],
            vocab_size=index["tokenizer"]["vocab_size"],
            eos_id=index["tokenizer"]["eos_id"],
        )
    return PreparedData(root, index, sets["train"], sets["val"], reused=False)


def _reusable(root: Path, key: str) -> PreparedData | None:
    try:
        data = open_prepared(root)
    except (FileNotFoundError, KeyError, ValueError):
        return None
    if data.index.get("inputs_hash") != key:
        return None
    tok = root / TOKENIZER_FILE
    if (
        not tok.is_file()
        or hashlib.sha256(tok.read_bytes()).hexdigest() != data.index["tokenizer"]["sha256"]
    ):
        return None
    data.reused = True
    return data


# ---------------------------------------------------------------- prepare


def prepare(cfg: DataConfig, *, force: bool = False, progress: bool | None = None) -> PreparedData:
    """Tokenize `cfg`'s corpus into `cfg.dir`, or reuse what is there if it was made from the
    same inputs and settings. `progress`: show bars (None: only on a terminal).

    Safe to call from every rank of a distributed run at once: an exclusive lock on
    `<dir>/.lock` lets one process build while the others wait, then find the result reusable.
    """
    root = Path(cfg.dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    key = inputs_hash(cfg)
    if not force and (existing := _reusable(root, key)) is not None:
        log.info("data: reusing %s (fingerprint %s)", root, existing.fingerprint[:12])
        return existing
    with _exclusive(root / ".lock"):
        # Another process may have finished the same work while we waited for the lock.
        if not force and (existing := _reusable(root, key)) is not None:
            return existing
        return _prepare_locked(cfg, root, key, progress)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; run prepare from one process there
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _prepare_locked(cfg: DataConfig, root: Path, key: str, progress: bool | None) -> PreparedData:
    _remove_stale_staging(root)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(), dir=root))
    try:
        t0 = time.perf_counter()
        tok = cfg.tokenizer.path or f"a new {cfg.tokenizer.vocab_size}-token byte-level BPE"
        log.info("data: preparing %s from source '%s' with %s", root, cfg.source, tok)
        index = _build(cfg, staging, key, progress)
        _install(staging, root)
        log.info(
            "data: prepared %s in %.1f s: train %d tokens, val %d tokens, fingerprint %s",
            root,
            time.perf_counter() - t0,
            index["splits"]["train"]["tokens"],
            index["splits"]["val"]["tokens"],
            index["fingerprint"][:12],
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return open_prepared(root)


def _build(cfg: DataConfig, out: Path, key: str, progress: bool | None) -> dict[str, Any]:
    disable = None if progress is None else not progress  # tqdm: None = only on a TTY
    # HF datasets' Arrow cache for local files is scratch: keep it in the staging dir.
    corpus = open_corpus(cfg, cache_dir=str(out / "hf_cache"), progress=progress)
    tok = _make_tokenizer(cfg, corpus, out / TOKENIZER_FILE)
    dtype = token_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    writers = {s: ShardWriter(out / s, s, dtype, cfg.shard_tokens) for s in SPLITS}
    docs = dict.fromkeys(SPLITS, 0)

    bar = tqdm(total=corpus.num_documents, unit="doc", desc="data: tokenize", disable=disable)
    with bar:
        for train, val in corpus.split_batches():
            for split, texts in (("train", train), ("val", val)):
                if texts:
                    parts = []
                    for ids in tok.encode_batch(texts):
                        parts += [np.asarray(ids, dtype=dtype), eos]
                    writers[split].write(np.concatenate(parts))
                    docs[split] += len(texts)
            bar.update(len(train) + len(val))

    splits: dict[str, Any] = {}
    for split in SPLITS:
        shards = writers[split].close()
        if writers[split].total == 0:
            raise ValueError(f"data: the {split} split of {corpus.description} has no tokens")
        splits[split] = {
            "shards": [{"file": s.file, "tokens": s.tokens} for s in shards],
            "tokens": writers[split].total,
            "documents": docs[split],
            "sha256": writers[split].sha256,
        }
    shutil.rmtree(out / "hf_cache", ignore_errors=True)

    tokenizer = {
        "file": TOKENIZER_FILE,
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eos_token": tok.eos_token,
        "eos_id": tok.eos_id,
    }
    # The content fingerprint covers exactly what a model sees: the tokenizer and the token
    # streams (not how they are cut into files). Loader state and checkpoints carry it.
    fingerprint = _sha256_json(
        {
            "tokenizer": tok.sha256,
            "dtype": dtype_name(dtype),
            "train": splits["train"]["sha256"],
            "val": splits["val"]["sha256"],
        }
    )
    index = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "inputs_hash": key,
        "settings": prepare_settings(cfg),
        "source": corpus.description,
        "dtype": dtype_name(dtype),
        "tokenizer": tokenizer,
        "splits": splits,
    }
    # No timestamps or host names: the same inputs give a byte-identical directory.
    _write_synced(out / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def _make_tokenizer(cfg: DataConfig, corpus: Corpus, path: Path) -> LoadedTokenizer:
    tk = cfg.tokenizer
    if tk.path is not None:
        shutil.copyfile(Path(tk.path).expanduser(), path)
    else:
        bpe = train_bpe(
            corpus.documents("train"),
            tk.vocab_size,
            min_frequency=tk.min_frequency,
            eos_token=tk.eos_token,
            length=corpus.count("train"),
        )
        _write_synced(path, bpe.to_str(pretty=True))
    # Encode with the tokenizer as read back from disk, so the shards match the saved file.
    return load_tokenizer(path, tk.eos_token)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _install(staging: Path, root: Path) -> None:
    """Move the staged dataset into `root`; index.json goes last (see module docstring)."""
    (root / INDEX_FILE).unlink(missing_ok=True)
    for name in (TOKENIZER_FILE, *SPLITS):
        old = root / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        os.replace(staging / name, old)
    os.replace(staging / INDEX_FILE, root / INDEX_FILE)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- staging leftovers


def _staging_prefix() -> str:
    return f".staging-{socket.gethostname()}-{os.getpid()}-"


def _remove_stale_staging(root: Path) -> None:
    """Delete staging dirs left by crashed prepares of this host (their pid is gone). Others'
    are left alone: on a shared filesystem they may belong to a live process elsewhere."""
    host = socket.gethostname()
    for d in root.glob(".staging-*"):
        parts = d.name.split("-")
        try:
            pid = int(parts[-2])
        except (ValueError, IndexError):
            continue
        if "-".join(parts[1:-2]) != host or _pid_alive(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
