import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m neotron ...` in a fresh process, as a user would."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "neotron", *args], capture_output=True, text=True,
        timeout=timeout, env=full_env, cwd=cwd or ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"neotron {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def fresh_logging():
    """For tests that call `neotron.cli.main` in-process: main's logging.basicConfig binds the
    console handler to the sys.stdout of its first call (a capture that pytest later closes),
    so each such test starts and ends without root handlers."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    yield
    root.handlers[:] = saved


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The Shakespeare corpus with a 512-token BPE, prepared once for the whole session and
    shared by every end-to-end test that trains on it (pass `data.dir=<this>`)."""
    from neotron.data.config import DataConfig
    from neotron.data.prepare import prepare

    d = tmp_path_factory.mktemp("shakespeare-bpe512")
    prepare(DataConfig(source="shakespeare", dir=str(d), tokenizer={"vocab_size": 512},
                       seq_len=32))
    return d


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """A tiny llama trained 4 steps with a checkpoint at step 4 (tests.test_train_e2e.tiny).
    Shared: copy it before changing anything in it."""
    import logging

    from neotron.cli import main
    from tests.test_train_e2e import tiny

    run = tmp_path_factory.mktemp("trained") / "run"
    args = tiny(run, data_dir, "train.steps=4", "eval.every=0", "eval.at_start=false")
    root = logging.getLogger()
    saved = root.handlers[:]
    assert main(["train", *args]) == 0
    root.handlers[:] = saved
    return run
