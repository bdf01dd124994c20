"""End-to-end runs of `neotron train` / `neotron eval` in real processes: exact resume,
crash safety while checkpointing, graceful SIGTERM, and the run directory's contents."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from neotron.config import load
from tests.conftest import ROOT, run_cli

DEMO = str(ROOT / "configs" / "demo" / "llama.yaml")


def tiny(run_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    """A model small enough that a step takes milliseconds; 2 micro-batches per step."""
    return [
        DEMO, f"run_dir={run_dir}", f"data.dir={data_dir}", "data.tokenizer.vocab_size=512",
        "data.seq_len=32", "model.vocab_size=512", "model.dim=32", "model.n_layers=2",
        "model.blocks.attention.mixer.n_heads=2", "model.blocks.attention.mixer.n_kv_heads=1",
        "train.global_batch_tokens=256", "train.micro_batch_size=4", "train.steps=8",
        "optim.schedule.warmup_steps=2", "eval.every=4", "eval.batches=2", "eval.batch_size=4",
        "checkpoint.every=4", "log.every=1", *extra,
    ]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(run_dir) if "loss" in r]


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in records(run_dir) if "val_loss" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    run_cli("train", *tiny(run_dir, data_dir), check=True)
    return run_dir


def test_run_directory_contents(straight):
    recs = records(straight)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"):
        assert key in steps[0], key
    assert steps[-1]["tokens"] == 8 * 256
    assert [s for s, _ in val_losses(straight)] == [0, 4, 8]
    saved = load(straight / "config.yaml")  # the resolved config is a loadable config
    assert saved.train.steps == 8 and saved.model.dim == 32
    assert list((straight / "tb").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (straight / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000004", "step_00000008"]
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_00000008"


def test_stop_and_resume_reproduces_losses_bitwise(straight, tmp_path, data_dir):
    first = run_cli("train", *tiny(tmp_path, data_dir, "train.stop_at_step=4"), check=True)
    assert "stopping at step 4" in first.stdout
    assert len(train_losses(tmp_path)) == 4
    second = run_cli("train", *tiny(tmp_path, data_dir), check=True)
    assert "resumed from" in second.stdout and "(step 4)" in second.stdout
    assert train_losses(tmp_path) == train_losses(straight)  # exact float equality
    assert val_losses(tmp_path) == val_losses(straight)


def test_sigkill_while_checkpointing_resumes_from_previous(straight, tmp_path, data_dir):
    run_cli("train", *tiny(tmp_path, data_dir, "train.stop_at_step=4"), check=True)
    # Second leg: checkpoint every 2 steps; the save at step 6 stalls after writing its
    # tensors (fault injection), and we SIGKILL it there.
    args = tiny(tmp_path, data_dir, "checkpoint.every=2")
    env = {"NEOTRON_FAULT_INJECT": "checkpoint.after_tensors:120", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "neotron", "train", *args], cwd=ROOT,
                            env={**__import__("os").environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    partial = tmp_path / "checkpoints" / ".tmp-step_00000006"
    deadline = time.time() + 120
    while not (partial / ".metadata").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the checkpoint at step 6 never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert not (ckpts / "step_00000006").exists()
    assert partial.exists()  # the torn write is there, and ignored
    # Third leg: resumes from step 4, not from the torn step-6 directory.
    third = run_cli("train", *args, check=True)
    assert "(step 4)" in third.stdout
    assert train_losses(tmp_path) == train_losses(straight)
    assert not partial.exists()


def test_sigterm_saves_and_exits_zero(tmp_path, data_dir):
    args = tiny(tmp_path, data_dir, "train.steps=100000", "checkpoint.every=0",
                "eval.every=0", "eval.at_start=false")
    proc = subprocess.Popen([sys.executable, "-m", "neotron", "train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped_early"] is True
    step = summary["step"]
    assert f"stopping at step {step} (SIGTERM)" in out
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{step:08d}"


def test_eval_command_reports_latest_checkpoint(straight, data_dir):
    proc = run_cli("eval", *tiny(straight, data_dir), check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 8
    final_val = val_losses(straight)[-1][1]
    assert result["loss"] == pytest.approx(final_val, abs=1e-6)
    assert result["ppl"] == pytest.approx(2.718281828 ** final_val, rel=1e-6)


def test_eval_without_checkpoint_is_a_usage_error(tmp_path, data_dir):
    proc = run_cli("eval", *tiny(tmp_path, data_dir))
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_config_shape_is_what_readme_promises():
    cfg = yaml.safe_load(Path(DEMO).read_text())
    assert cfg["data"]["source"] == "shakespeare"
    assert load(DEMO).train.device == "auto"
