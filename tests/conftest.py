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
