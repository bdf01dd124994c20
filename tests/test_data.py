"""Data pipeline: config checks, corpus split, tokenizer/shard determinism and reuse, atomic
writes, and the globally ordered, resumable loader."""

from __future__ import annotations

import json
import os
import random
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers

from neotron.data import prepare as prepare_mod
from neotron.data.config import DataConfig
from neotron.data.corpus import (
    doc_hash_unit,
    hash_split,
    play_key,
    shakespeare_documents,
    shakespeare_split,
    shakespeare_texts,
)
from neotron.data.loader import TokenLoader, ValLoader
from neotron.data.prepare import inputs_hash, open_prepared, prepare
from neotron.data.shards import ShardSet, ShardWriter, token_dtype
from neotron.data.tokenizer import load_tokenizer

WORDS = "the king queen crown sword night day love death blood sweet fair lord lady ghost".split()


def _doc(rng: random.Random, n_words: int) -> str:
    lines = []
    for _ in range(max(1, n_words // 8)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, object]:
    """A small mixed-format corpus: 4 .txt files, a .jsonl and a .parquet file."""
    rng = random.Random(0)
    d = tmp_path / "corpus"
    d.mkdir()
    docs = []
    for i in range(4):
        text = _doc(rng, 40 + 8 * i)
        (d / f"part{i}.txt").write_text(text, encoding="utf-8")
        docs.append(text)
    rows = [_doc(rng, 16 + i) for i in range(20)]
    with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(rows):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    docs += rows
    prows = [_doc(rng, 24) + f"Scene {i}." for i in range(6)]
    pq.write_table(pa.table({"text": prows}), d / "more.parquet")
    docs += prows
    paths = [str(d / "part*.txt"), str(d / "docs.jsonl"), str(d / "more.parquet")]
    return {"dir": d, "paths": paths, "docs": docs}


def files_cfg(corpus: dict[str, object], out: Path, **kw: object) -> DataConfig:
    args: dict[str, object] = {
        "source": "files",
        "paths": corpus["paths"],
        "dir": str(out),
        "tokenizer": {"vocab_size": 300},
        "val_fraction": 0.2,
        "shard_tokens": 500,  # small shards: documents straddle files
    }
    args.update(kw)
    return DataConfig(**args)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _split_docs(data, split: str) -> list[str]:
    """Decode a split's stream back into documents, cutting at EOS."""
    tok = data.tokenizer()
    stream = data.split(split).tokens().astype(np.int64)
    assert stream[-1] == data.eos_id
    cuts = np.flatnonzero(stream == data.eos_id)
    docs, start = [], 0
    for c in cuts:
        docs.append(tok.decode(stream[start:c].tolist()))
        start = c + 1
    return docs


# ---------------------------------------------------------------- config


def test_config_errors_name_the_bad_key(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "*.txt")
    with pytest.raises(ValidationError, match="no file matches") as e:
        DataConfig(source="files", paths=[missing])
    assert missing in str(e.value)
    single = str(tmp_path / "absent.jsonl")
    with pytest.raises(ValidationError, match="absent.jsonl"):
        DataConfig(source="files", paths=[single])
    with pytest.raises(ValidationError, match="at least one"):
        DataConfig(source="files")
    with pytest.raises(ValidationError, match="hf_name"):
        DataConfig(source="hf")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValidationError, match="unsupported suffix"):
        DataConfig(source="files", paths=[str(tmp_path / "a.csv")])
    for bad in ({"val_fraction": 0.0}, {"val_fraction": 0.6}, {"seq_len": 0}):
        with pytest.raises(ValidationError):
            DataConfig(**bad)
    with pytest.raises(ValidationError, match="did you mean 'seq_len'"):
        DataConfig(seqlen=128)
    assert DataConfig().dir == ".neotron/data/shakespeare"
    assert DataConfig(source="hf", hf_name="a/b").dir == ".neotron/data/hf/a__b"


# ---------------------------------------------------------------- prepare


def test_same_inputs_give_identical_dataset(corpus, tmp_path: Path) -> None:
    a = prepare(files_cfg(corpus, tmp_path / "a"), progress=True)
    b = prepare(files_cfg(corpus, tmp_path / "b"))
    assert not a.reused and not b.reused
    assert a.fingerprint == b.fingerprint
    tree_a, tree_b = _tree(a.dir), _tree(b.dir)
    assert tree_a == tree_b  # tokenizer.json, index.json and every shard, byte for byte
    assert len(a.index["splits"]["train"]["shards"]) > 1
    assert not any(name.startswith(".staging") for name in tree_a)


def test_changed_input_changes_fingerprint(corpus, tmp_path: Path) -> None:
    cfg = files_cfg(corpus, tmp_path / "out")
    first = prepare(cfg)
    # A stale staging dir from a "crashed" prepare of this host is cleaned up.
    stale = first.dir / f".staging-{socket.gethostname()}-999999999-abc"
    stale.mkdir()
    path = corpus["dir"] / "part0.txt"
    path.write_text(path.read_text() + "A new line.\n")
    assert inputs_hash(cfg) != first.index["inputs_hash"]
    second = prepare(cfg)
    assert not second.reused
    assert second.fingerprint != first.fingerprint
    assert not stale.exists()


def test_rerun_reuses_unchanged_and_rebuilds_changed(corpus, tmp_path: Path) -> None:
    cfg = files_cfg(corpus, tmp_path / "out")
    first = prepare(cfg)
    mtimes = {p: p.stat().st_mtime_ns for p in first.dir.rglob("*") if p.is_file()}
    again = prepare(cfg)
    assert again.reused and again.fingerprint == first.fingerprint
    assert {p: p.stat().st_mtime_ns for p in first.dir.rglob("*") if p.is_file()} == mtimes
    # seq_len does not change the shards; the tokenizer settings do.
    assert prepare(files_cfg(corpus, tmp_path / "out", seq_len=7)).reused
    other = prepare(files_cfg(corpus, tmp_path / "out", tokenizer={"vocab_size": 320}))
    assert not other.reused and other.fingerprint != first.fingerprint
    assert not prepare(cfg, force=True).reused


def test_concurrent_prepares_build_once(corpus, tmp_path: Path) -> None:
    # Every rank of a distributed run calls prepare(); the lock makes one build, others reuse.
    cfg = files_cfg(corpus, tmp_path / "out")
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: prepare(cfg), range(3)))
    assert sorted(r.reused for r in results) == [False, True, True]
    assert len({r.fingerprint for r in results}) == 1
    assert open_prepared(cfg.dir).fingerprint == results[0].fingerprint


def test_documents_are_eos_separated_and_split_disjoint(corpus, tmp_path: Path) -> None:
    data = prepare(files_cfg(corpus, tmp_path / "out"))
    train, val = _split_docs(data, "train"), _split_docs(data, "val")
    assert len(train) == data.index["splits"]["train"]["documents"]
    assert len(val) == data.index["splits"]["val"]["documents"]
    assert train and val
    assert sorted(train + val) == sorted(corpus["docs"])  # byte-level BPE round-trips exactly
    assert not set(train) & set(val)
    # The split is the documented hash rule.
    for doc in val:
        assert doc_hash_unit(doc) < 0.2 or len(val) == 1


def test_hash_split_never_leaves_a_side_empty() -> None:
    assert hash_split(np.array([0.9, 0.8, 0.7]), 0.1).tolist() == [False, False, True]
    assert hash_split(np.array([0.01, 0.02, 0.03]), 0.1).tolist() == [True, True, False]
    assert hash_split(np.array([0.05, 0.5]), 0.1).tolist() == [True, False]


def test_token_dtype_choice(corpus, tmp_path: Path) -> None:
    assert token_dtype(300) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert prepare(files_cfg(corpus, tmp_path / "small")).dtype == np.uint16

    # A given tokenizer whose ids go past 65535: shards must be uint32 and keep the ids intact.
    vocab = {f"w{i}": i for i in range(70000)}
    vocab["[UNK]"] = 70000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok_path = tmp_path / "big_tokenizer.json"
    tok.save(str(tok_path))
    docs = tmp_path / "big"
    docs.mkdir()
    for i in range(8):
        (docs / f"d{i}.txt").write_text(f"w{69990 + i} w{i} w65536")
    cfg = DataConfig(
        source="files",
        paths=[str(docs / "*.txt")],
        dir=str(tmp_path / "big_out"),
        tokenizer={"path": str(tok_path)},
        val_fraction=0.2,
    )
    data = prepare(cfg)
    assert data.dtype == np.uint32 and data.index["dtype"] == "uint32"
    assert data.eos_id == 70001 and data.vocab_size == 70002
    stream = np.concatenate([data.train.tokens(), data.val.tokens()])
    assert sorted(stream[0::4]) == list(range(69990, 69998))
    assert set(stream[2::4]) == {65536} and set(stream[3::4]) == {70001}

    bad = tmp_path / "no_eos.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(bad))
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        load_tokenizer(bad)


def test_crash_never_leaves_a_dataset_that_looks_complete(
    corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = files_cfg(corpus, tmp_path / "out")
    old = prepare(cfg)
    path = corpus["dir"] / "part1.txt"
    path.write_text(path.read_text() + "Changed.\n")

    # Crash while tokenizing: the previous dataset is untouched.
    def boom(self, tokens):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(prepare_mod.ShardWriter, "write", boom)
        with pytest.raises(RuntimeError, match="simulated"):
            prepare(cfg)
    assert open_prepared(cfg.dir).fingerprint == old.fingerprint

    # Crash while swapping in the new files, before index.json lands: no index, not "complete".
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("index.json"):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(prepare_mod.os, "replace", replace)
        with pytest.raises(OSError, match="simulated"):
            prepare(cfg)
    with pytest.raises(FileNotFoundError):
        open_prepared(cfg.dir)
    new = prepare(cfg)
    assert not new.reused and new.fingerprint != old.fingerprint
    assert not list(Path(cfg.dir).glob(".staging-*"))


def test_hf_source_fails_clearly_offline(tmp_path: Path, monkeypatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = DataConfig(source="hf", hf_name="someone/corpus", dir=str(tmp_path / "hf"))
    with pytest.raises(RuntimeError, match="network") as e:
        prepare(cfg)
    assert "someone/corpus" in str(e.value) and "source=files" in str(e.value)


# ---------------------------------------------------------------- shakespeare


def test_shakespeare_split_keeps_both_versions_of_a_play_together() -> None:
    texts = shakespeare_texts()
    assert len(texts) == 77 and "metadata.txt" not in texts
    split = shakespeare_split(texts, 0.05)
    train, val = set(split["train"]), set(split["val"])
    assert train and val and not train & val and train | val == set(texts)
    side = {name: ("val" if name in val else "train") for name in texts}
    modern = {play_key(n) for n in texts if n.endswith("_gut.txt")}
    folios = [n for n in texts if n.endswith("_gut_f.txt")]
    assert len(folios) == 35
    for folio in folios:
        # Every First Folio text finds its modern edition (alias table complete) ...
        assert play_key(folio) in modern, folio
        partner = [n for n in texts if n != folio and play_key(n) == play_key(folio)]
        assert len(partner) == 1
        # ... and sits on the same side of the split.
        assert side[folio] == side[partner[0]]
    assert any(n.endswith("_gut_f.txt") for n in val)  # a two-version play is held out
    held = sum(len(texts[n]) for n in val) / sum(len(t) for t in texts.values())
    assert 0.05 <= held <= 0.12
    docs = shakespeare_documents(0.05)
    assert docs["val"] == [texts[n] for n in split["val"]]


def test_prepare_shakespeare_corpus(tmp_path: Path) -> None:
    cfg = DataConfig(dir=str(tmp_path / "shk"), tokenizer={"vocab_size": 512})
    data = prepare(cfg)
    split = shakespeare_split(shakespeare_texts(), cfg.val_fraction)
    for name in ("train", "val"):
        info = data.index["splits"][name]
        assert info["documents"] == len(split[name])
        assert int((data.split(name).tokens() == data.eos_id).sum()) == info["documents"]
    assert 0.03 < data.val.total_tokens / data.train.total_tokens < 0.15
    first_val = shakespeare_texts()[split["val"][0]]
    assert _split_docs(data, "val")[0] == first_val


# ---------------------------------------------------------------- shards and loader


def _arange_shards(tmp_path: Path, n_tokens: int, shard_tokens: int = 50) -> ShardSet:
    """Token value == stream position, so a window identifies itself by its first token."""
    w = ShardWriter(tmp_path / "syn", "train", np.dtype("<u4"), shard_tokens)
    w.write(np.arange(n_tokens // 3))  # several writes straddling shard boundaries
    w.write(np.arange(n_tokens // 3, n_tokens))
    return ShardSet(
        w.dir, w.close(), np.dtype("<u4"), fingerprint="fp-test", vocab_size=2**32, eos_id=0
    )


def test_shardset_reads_across_boundaries(tmp_path: Path) -> None:
    s = _arange_shards(tmp_path, 237, shard_tokens=20)
    assert s.total_tokens == 237 and len(s.shards) == 12
    for start, n in [(0, 237), (15, 10), (19, 1), (20, 41), (230, 7), (237, 0)]:
        assert s.read(start, n).tolist() == list(range(start, start + n))
    with pytest.raises(IndexError):
        s.read(230, 8)


def _run(loader: TokenLoader, steps: int, batch: int) -> list[torch.Tensor]:
    return [loader.next_batch(batch) for _ in range(steps)]


def test_loader_windows_are_shifted_token_runs(tmp_path: Path) -> None:
    shards = _arange_shards(tmp_path, 1001)
    loader = TokenLoader(shards, seq_len=8, seed=1)
    assert loader.num_samples == 125
    b = loader.next_batch(6)
    assert b.dtype == torch.int64 and b.shape == (6, 9) and b.device.type == "cpu"
    for row in b:
        assert row[0] % 8 == 0 and row.tolist() == list(range(row[0], row[0] + 9))
    assert loader.consumed == 6


def test_loader_resume_continues_uninterrupted_order(tmp_path: Path) -> None:
    shards = _arange_shards(tmp_path, 1001)
    reference = _run(TokenLoader(shards, 8, seed=5), 7, 6)
    first = TokenLoader(shards, 8, seed=5)
    _run(first, 3, 6)
    state = first.state_dict()
    assert state == {"consumed": 18, "seed": 5, "fingerprint": "fp-test"}
    resumed = TokenLoader(shards, 8, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for ref, got in zip(reference[3:], _run(resumed, 4, 6)):
        assert torch.equal(ref, got)
    other_seed = _run(TokenLoader(shards, 8, seed=6), 1, 6)[0]
    assert not torch.equal(other_seed, reference[0])


def test_loader_resume_on_other_dp_world_continues_global_order(tmp_path: Path) -> None:
    shards = _arange_shards(tmp_path, 1001)
    reference = _run(TokenLoader(shards, 8, seed=3), 6, 4)
    single = TokenLoader(shards, 8, seed=3)
    _run(single, 2, 4)
    state = single.state_dict()
    ranks = [TokenLoader(shards, 8, seed=3, dp_rank=r, dp_world=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for step in range(2, 6):
        parts = [r.next_batch(4) for r in ranks]
        assert all(p.shape == (2, 9) for p in parts)
        assert torch.equal(torch.cat(parts), reference[step])
    # ... and back from 2 ranks to 4.
    quad = [TokenLoader(shards, 8, seed=3, dp_rank=r, dp_world=4) for r in range(4)]
    for q in quad:
        q.load_state_dict(ranks[0].state_dict())
    tail = _run(TokenLoader(shards, 8, seed=3), 7, 4)[6]
    assert torch.equal(torch.cat([q.next_batch(4) for q in quad]), tail)
    with pytest.raises(ValueError, match="multiple"):
        ranks[0].next_batch(5)


def test_epochs_are_fresh_permutations_covering_every_window(tmp_path: Path) -> None:
    shards = _arange_shards(tmp_path, 4 * 10 + 1)
    loader = TokenLoader(shards, seq_len=4, seed=0)
    assert loader.num_samples == 10
    rng_before = torch.random.get_rng_state()
    seen = torch.cat(_run(loader, 10, 3))[:, 0] // 4  # 30 samples = 3 epochs, batches straddle
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    epochs = [seen[i * 10 : (i + 1) * 10].tolist() for i in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(10))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert loader.epoch == 3


def test_load_state_rejects_other_seed_or_dataset(tmp_path: Path) -> None:
    shards = _arange_shards(tmp_path, 1001)
    loader = TokenLoader(shards, 8, seed=1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(shards, 8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        loader.load_state_dict({**state, "fingerprint": "something-else"})


def test_val_loader_is_fixed_and_sliced_per_rank(tmp_path: Path) -> None:
    shards = _arange_shards(tmp_path, 8 * 30 + 1)
    val = ValLoader(shards, 8, global_batch_size=4, n_batches=3)
    batches = list(val)
    assert len(val) == 3 and [b.shape for b in batches] == [(4, 9)] * 3
    assert torch.cat(batches)[:, 0].tolist() == [8 * i for i in range(12)]  # first windows
    assert all(torch.equal(a, b) for a, b in zip(batches, list(val)))
    halves = [list(ValLoader(shards, 8, 4, 3, dp_rank=r, dp_world=2)) for r in range(2)]
    for b, (lo, hi) in zip(batches, zip(*halves)):
        assert torch.equal(torch.cat([lo, hi]), b)
    assert len(ValLoader(shards, 8, 4, n_batches=100)) == 7  # clamped to full batches
    with pytest.raises(ValueError, match="val split"):
        ValLoader(shards, 8, 64)


def test_loader_on_prepared_data(corpus, tmp_path: Path) -> None:
    data = prepare(files_cfg(corpus, tmp_path / "out"))
    loader = TokenLoader(data.train, seq_len=16, seed=0)
    assert loader.fingerprint == data.fingerprint
    b = loader.next_batch(4)
    assert b.shape == (4, 17) and int(b.max()) < data.vocab_size
    stream = data.train.tokens().astype(np.int64)
    start = int(loader.window_indices(0, 1)[0]) * 16
    assert b[0].tolist() == stream[start : start + 17].tolist()
