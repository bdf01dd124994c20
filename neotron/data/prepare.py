"""Text -> tokenizer -> packed token shards, written atomically and reused when unchanged.

Layout of `cfg.dir`:

    tokenizer.json
    train/train_000000.bin ...
    val/val_000000.bin ...
    index.json          written last: its presence means the dataset is complete

Everything is built in `<dir>/.staging-*` and moved into place; the old `index.json` is removed
before the old files are replaced and the new one is moved in after them, so a crash at any
instant leaves either a complete dataset or one without an index (which the next `prepare`
rebuilds), never a half-written one that looks complete. A prepare that fails (a bad corpus
file or tokenizer) therefore leaves the previous dataset exactly as it was.

A dataset whose index.json matches the inputs but whose files do not match the index (a
truncated or missing shard, an edited or unparsable index, another tokenizer.json) is refused
with a `DataError` naming the file, never silently rebuilt or used: the user decides, with
`neotron prepare --force`.
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

from neotron.data.config import DataConfig
from neotron.data.corpus import Corpus, corpus_identity, open_corpus
from neotron.data.errors import REBUILD_HINT, DataError, reason
from neotron.data.progress import Progress
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


def _fingerprint(tokenizer_sha256: str, dtype: str, train_sha256: str, val_sha256: str) -> str:
    """The dataset's identity: what its tokens are, not how they were made (index.json's
    `fingerprint`, checked by open_prepared, saved in checkpoints' data position)."""
    return _sha256_json(
        {"tokenizer": tokenizer_sha256, "dtype": dtype, "train": train_sha256, "val": val_sha256}
    )


def prepare_settings(cfg: DataConfig, progress: bool | None = None) -> dict[str, Any]:
    """Everything the shard bytes depend on. seq_len and document_masking are not in it: they
    change how shards are read, not what they hold."""
    tk = cfg.tokenizer
    if tk.path is not None:
        path = Path(tk.path).expanduser()
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"data.tokenizer.path: cannot read '{path}': {reason(e)}") from e
        tokenizer: dict[str, Any] = {"file_sha256": hashlib.sha256(raw).hexdigest()}
    else:
        tokenizer = {"train_bpe": {"vocab_size": tk.vocab_size, "min_frequency": tk.min_frequency}}
    tokenizer["eos_token"] = tk.eos_token
    return {
        "format_version": FORMAT_VERSION,
        "corpus": corpus_identity(cfg, progress),
        "val_fraction": cfg.val_fraction,
        "tokenizer": tokenizer,
        "shard_tokens": cfg.shard_tokens,
    }


def inputs_hash(cfg: DataConfig, progress: bool | None = None) -> str:
    """Key for reuse: same inputs and settings => same hash => the shards on disk are kept."""
    return _sha256_json(prepare_settings(cfg, progress))


# ---------------------------------------------------------------- opening


def open_prepared(directory: str | Path, *, verify: bool = False) -> PreparedData:
    """Open a prepared dataset, checking that its files are what index.json records: the
    index's own fingerprint, the tokenizer's sha256, each shard's size. `verify` also hashes
    every token (reads the whole dataset). Raises FileNotFoundError if there is no index.json
    (never prepared, or a crash before it landed), `DataError` naming the file if the dataset
    is damaged."""
    root = Path(directory)
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"no prepared dataset at {root} (no {INDEX_FILE}); run prepare")
    index = _read_index(index_path)
    _check_index(index_path, index)
    tok_path = root / TOKENIZER_FILE
    tok_sha = _file_sha256(tok_path)
    if tok_sha is None:
        raise DataError(f"tokenizer {tok_path} is missing; {REBUILD_HINT}")
    if tok_sha != index["tokenizer"]["sha256"]:
        raise DataError(
            f"tokenizer {tok_path} is not the one {INDEX_FILE} records (changed or damaged);"
            f" {REBUILD_HINT}"
        )
    dtype = dtype_from_name(index["dtype"])
    sets = {}
    for split in SPLITS:
        shards = [ShardInfo(s["file"], s["tokens"]) for s in index["splits"][split]["shards"]]
        for s in shards:
            _check_shard(root / split / s.file, s.tokens * dtype.itemsize)
        sets[split] = ShardSet(
            root / split,
            shards,
            dtype,
            fingerprint=index["fingerprint"],
            vocab_size=index["tokenizer"]["vocab_size"],
            eos_id=index["tokenizer"]["eos_id"],
        )
        if verify and _stream_sha256(sets[split]) != index["splits"][split]["sha256"]:
            raise DataError(
                f"the {split} shards in {root / split} are damaged: their tokens do not hash to"
                f" the sha256 in {INDEX_FILE}; {REBUILD_HINT}"
            )
    return PreparedData(root, index, sets["train"], sets["val"], reused=False)


def _read_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read {path}: {reason(e)}") from e
    except ValueError as e:  # bad JSON or bad UTF-8
        raise DataError(f"{path} is damaged (not JSON: {reason(e)}); {REBUILD_HINT}") from e
    if not isinstance(index, dict):
        raise DataError(f"{path} is damaged (not a JSON object); {REBUILD_HINT}")
    return index


def _check_index(path: Path, index: dict[str, Any]) -> None:
    """The fields open_prepared uses have the right types, and the fingerprint matches them
    (an index edited by hand, or damaged, is refused)."""

    def bad(what: str) -> DataError:
        return DataError(f"{path} is damaged ({what}); {REBUILD_HINT}")

    def field(obj: Any, key: str, kind: type, where: str) -> Any:
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise bad(f"'{where}{key}' is missing or not a {kind.__name__}")
        return value

    if field(index, "dtype", str, "") not in ("uint16", "uint32"):
        raise bad(f"unknown dtype '{index['dtype']}'")
    tok = field(index, "tokenizer", dict, "")
    for key, kind in (("sha256", str), ("vocab_size", int), ("eos_id", int), ("eos_token", str)):
        field(tok, key, kind, "tokenizer.")
    splits = field(index, "splits", dict, "")
    for split in SPLITS:
        info = field(splits, split, dict, "splits.")
        where = f"splits.{split}."
        total = field(info, "tokens", int, where)
        field(info, "sha256", str, where)
        shards = field(info, "shards", list, where)
        for k, shard in enumerate(shards):
            name = field(shard, "file", str, f"{where}shards[{k}].")
            tokens = field(shard, "tokens", int, f"{where}shards[{k}].")
            if Path(name).name != name or name in ("", ".", "..") or tokens < 0:
                raise bad(f"'{where}shards[{k}]' is not a shard file name and token count")
        if sum(s["tokens"] for s in shards) != total:
            raise bad(f"the {split} shards do not add up to '{where}tokens'")
    fingerprint = _fingerprint(tok["sha256"], index["dtype"], splits["train"]["sha256"],
                               splits["val"]["sha256"])
    if field(index, "fingerprint", str, "") != fingerprint:
        raise bad("its fingerprint does not match its contents")


def _check_shard(path: Path, size: int) -> None:
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing; {REBUILD_HINT}") from None
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {reason(e)}") from e
    if not path.is_file():
        raise DataError(f"shard {path} is not a file; {REBUILD_HINT}")
    if actual != size:
        raise DataError(
            f"shard {path} has {actual} bytes where {INDEX_FILE} records {size}"
            f" (truncated or damaged); {REBUILD_HINT}"
        )


def _file_sha256(path: Path) -> str | None:
    """sha256 of a small file, None if it is missing."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DataError(f"cannot read {path}: {reason(e)}") from e


def _stream_sha256(shards: ShardSet) -> str:
    h = hashlib.sha256()
    step = 1 << 24
    for start in range(0, shards.total_tokens, step):
        h.update(shards.read(start, min(step, shards.total_tokens - start)).tobytes())
    return h.hexdigest()


def _reusable(root: Path, key: str, verify: bool) -> PreparedData | None:
    """The dataset in `root` if it was made from the same inputs, None if it should be
    (re)built. Raises `DataError` if it was made from these inputs but is damaged."""
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        return None  # never prepared, or a crash before the index landed: build it
    if _read_index(index_path).get("inputs_hash") != key:
        return None  # made from other inputs or settings: rebuilt, its files replaced
    data = open_prepared(root, verify=verify)
    data.reused = True
    return data


# ---------------------------------------------------------------- prepare


def prepare(
    cfg: DataConfig, *, force: bool = False, progress: bool | None = None, verify: bool = False
) -> PreparedData:
    """Tokenize `cfg`'s corpus into `cfg.dir`, or reuse what is there if it was made from the
    same inputs and settings. `progress`: show bars (None: only on a terminal; elsewhere,
    log lines every few seconds). `verify`: when reusing, also hash every token against the
    index (reads the whole dataset; sizes and the index are always checked).

    Raises `DataError` (one line naming the file or key) for a corpus file or tokenizer that
    cannot be used, and for a damaged dataset made from the same inputs; a failed prepare
    leaves the previous dataset as it was. Warns if a split is shorter than `data.seq_len`.

    Safe to call from every rank of a distributed run at once: an exclusive lock on
    `<dir>/.lock` lets one process build while the others wait, then find the result reusable.
    """
    root = Path(cfg.dir).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.dir: cannot create '{root}': {reason(e)}") from e
    key = inputs_hash(cfg, progress)
    if not force and (existing := _reusable(root, key, verify)) is not None:
        log.info("data: reusing %s (fingerprint %s)", root, existing.fingerprint[:12])
        return _check_seq_len(cfg, existing)
    with _exclusive(root / ".lock"):
        # Another process may have finished the same work while we waited for the lock.
        if not force and (existing := _reusable(root, key, verify)) is not None:
            return _check_seq_len(cfg, existing)
        return _check_seq_len(cfg, _prepare_locked(cfg, root, key, progress))


def _check_seq_len(cfg: DataConfig, data: PreparedData) -> PreparedData:
    """A window is seq_len + 1 tokens: warn now about a split shorter than one window (the
    shards are fine, and seq_len is not part of them; the loaders refuse it when a run
    reads the split)."""
    for split in SPLITS:
        tokens = data.split(split).total_tokens
        if tokens < cfg.seq_len + 1:
            log.warning(
                "data: warning: the %s split of %s has %d tokens, too few for one window of"
                " data.seq_len=%d (+1) tokens; a run with this data.seq_len will stop",
                split,
                data.dir,
                tokens,
                cfg.seq_len,
            )
    return data


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; run prepare from one process there
        yield
        return
    try:
        f = open(lock_path, "a+")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise DataError(f"data.dir: cannot write '{lock_path}': {reason(e)}") from e
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _prepare_locked(cfg: DataConfig, root: Path, key: str, progress: bool | None) -> PreparedData:
    _remove_stale_staging(root)
    try:
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(), dir=root))
    except OSError as e:
        raise DataError(f"data.dir: cannot write in '{root}': {reason(e)}") from e
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
    # A given tokenizer is checked where the user put it, so an error names that file.
    given = _given_tokenizer(cfg)
    # HF datasets' Arrow cache for local files is scratch: keep it in the staging dir.
    corpus = open_corpus(cfg, cache_dir=str(out / "hf_cache"), progress=progress)
    tok = _make_tokenizer(cfg, corpus, out / TOKENIZER_FILE, given, progress)
    dtype = token_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    writers = {s: ShardWriter(out / s, s, dtype, cfg.shard_tokens) for s in SPLITS}
    docs = dict.fromkeys(SPLITS, 0)

    with Progress("data: tokenize", corpus.num_documents, "doc", progress=progress) as bar:
        for train, val in corpus.split_batches():
            written = 0
            for split, texts in (("train", train), ("val", val)):
                if texts:
                    parts = []
                    for ids in tok.encode_batch(texts):
                        parts += [np.asarray(ids, dtype=dtype), eos]
                    tokens = np.concatenate(parts)
                    writers[split].write(tokens)
                    written += len(tokens)
                    docs[split] += len(texts)
            bar.update(len(train) + len(val), tokens=written)

    splits: dict[str, Any] = {}
    for split in SPLITS:
        shards = writers[split].close()
        if writers[split].total == 0:
            raise DataError(
                f"data: the {split} split of {corpus.description} has no tokens (its documents"
                " are all empty); add text or change data.val_fraction"
            )
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
    fingerprint = _fingerprint(tok.sha256, dtype_name(dtype), splits["train"]["sha256"],
                               splits["val"]["sha256"])
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


def _given_tokenizer(cfg: DataConfig) -> Path | None:
    tk = cfg.tokenizer
    if tk.path is None:
        return None
    path = Path(tk.path).expanduser()
    load_tokenizer(path, tk.eos_token)  # raises DataError naming `path`
    return path


def _make_tokenizer(
    cfg: DataConfig, corpus: Corpus, path: Path, given: Path | None, progress: bool | None
) -> LoadedTokenizer:
    tk = cfg.tokenizer
    if given is not None:
        shutil.copyfile(given, path)
    else:
        # On a terminal the tokenizers library draws its own bar; elsewhere, log lines.
        with Progress(
            "data: train BPE", corpus.count("train"), "doc", progress=progress, bar=False
        ) as bar:

            def texts() -> Iterator[str]:
                for text in corpus.documents("train"):
                    bar.update(1)
                    yield text

            bpe = train_bpe(
                texts(),
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
