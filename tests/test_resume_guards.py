"""Bad resumes and failed saves: one line naming the file or key, exit status 2, nothing lost.

Each case starts from a copy of a real run (a checkpoint at step 4) and checks, beside the
status and the single stderr line, that the checkpoints are byte-identical afterwards.
Also: a run whose training draws random numbers (dropout) resumes bit for bit, which fails if
the trainer stops restoring the RNG state.
"""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from neotron.cli import main
from tests.test_train_e2e import tiny, train_losses

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("fresh_logging")]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_exit_2(argv: list[str], capsys, *needles: str) -> str:
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def _resume(run: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["train", *tiny(run, data_dir, "train.steps=6", "eval.every=0",
                           "eval.at_start=false", *extra)]


def test_vocab_smaller_than_tokenizer(tmp_path, data_dir, capsys):
    """A tokenizer file larger than model.vocab_size (the config alone cannot know)."""
    tok = data_dir / "tokenizer.json"
    args = tiny(tmp_path / "r", tmp_path / "data", "model.vocab_size=300",
                f"data.tokenizer.path={tok}")
    line = _one_line_exit_2(["train", *args], capsys, "model.vocab_size", "512")
    assert "tokenizer.json" in line
    assert not (tmp_path / "r").exists()


def test_one_config_error_is_one_line(tmp_path, data_dir, capsys):
    _one_line_exit_2(["train", *tiny(tmp_path / "r", data_dir, "model.vocab_size=300")],
                     capsys, "invalid config: model.vocab_size")


@pytest.mark.parametrize("override,needle", [
    ("data.seq_len=16", "data.seq_len"),
    ("model.dim=48", "shape"),
    ("model.n_layers=3", "layers.2"),
    ("train.seed=7", "seed"),
])
def test_resume_that_does_not_fit_is_refused(run, data_dir, capsys, override, needle):
    before = _hashes(run)
    _one_line_exit_2(_resume(run, data_dir, override), capsys, needle)
    assert _hashes(run) == before


def test_run_dir_of_another_architecture_is_refused(run, data_dir, capsys):
    before = _hashes(run)
    other = ["model.blocks.attention.mixer={type: deltanet, n_heads: 2}"]
    _one_line_exit_2(_resume(run, data_dir, *other), capsys, "another model")
    assert _hashes(run) == before


@pytest.mark.parametrize("command", ["train", "eval", "convert"])
def test_latest_naming_a_missing_checkpoint(run, data_dir, tmp_path, capsys, command):
    (run / "checkpoints" / "latest").write_text("step_00000009\n")
    before = _hashes(run)
    argv = (["convert", str(run), str(tmp_path / "out")] if command == "convert"
            else [command, *_resume(run, data_dir)[1:]])
    _one_line_exit_2(argv, capsys, "latest", "step_00000009", "step_00000004")
    assert _hashes(run) == before


def test_corrupted_meta_json(run, data_dir, capsys):
    meta = run / "checkpoints" / "step_00000004" / "meta.json"
    meta.write_text(meta.read_text()[:20])
    before = _hashes(run)
    _one_line_exit_2(_resume(run, data_dir), capsys, "meta.json")
    assert _hashes(run) == before


@pytest.mark.parametrize("async_", [False, True])
def test_full_disk_while_checkpointing(run, data_dir, capsys, monkeypatch, async_):
    """An injected ENOSPC in the DCP write: the run stops with one line, the partial
    checkpoint is removed, and `latest` still names the intact step-4 checkpoint."""
    ckpts = run / "checkpoints"
    before = _hashes(ckpts)
    monkeypatch.setenv("NEOTRON_FAULT_INJECT", "checkpoint.write:enospc")
    _one_line_exit_2(_resume(run, data_dir, "checkpoint.every=2",
                             f"checkpoint.async={str(async_).lower()}"),
                     capsys, "step_00000006", "No space left", "step_00000004 is intact")
    assert _hashes(ckpts) == before
    assert not list(ckpts.glob(".tmp-*"))
    monkeypatch.delenv("NEOTRON_FAULT_INJECT")
    assert main(_resume(run, data_dir)) == 0  # and the run resumes from step 4


def test_full_disk_on_a_real_tmpfs(trained_run, tmp_path, data_dir, capsys):
    """The same with a real full file system: a tmpfs with room for half a checkpoint more."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    used = sum(p.stat().st_size for p in trained_run.rglob("*") if p.is_file())
    ckpt = sum(p.stat().st_size for p in (trained_run / "checkpoints").rglob("*")
               if p.is_file())
    size_kib = (used + ckpt // 2) // 1024 + 64
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = mnt / "run"
        shutil.copytree(trained_run, run)
        before = _hashes(run / "checkpoints")
        _one_line_exit_2(_resume(run, data_dir, "checkpoint.every=2", "log.every=100"), capsys,
                         "step_00000006", "step_00000004 is intact")
        assert _hashes(run / "checkpoints") == before
        assert not list((run / "checkpoints").glob(".tmp-*"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_resume_is_exact_when_training_draws_random_numbers(tmp_path, data_dir):
    """model.dropout draws a mask every step: resuming reproduces the uninterrupted run's
    losses only if the RNG state is saved and restored."""
    common = ("train.steps=6", "model.dropout=0.2", "eval.every=0", "eval.at_start=false",
              "checkpoint.every=3")
    straight, resumed, plain = tmp_path / "straight", tmp_path / "resumed", tmp_path / "plain"
    assert main(["train", *tiny(straight, data_dir, *common)]) == 0
    assert main(["train", *tiny(resumed, data_dir, *common, "train.stop_at_step=3")]) == 0
    assert main(["train", *tiny(resumed, data_dir, *common)]) == 0
    assert train_losses(resumed) == train_losses(straight)
    # and dropout really is on: without it the losses differ
    assert main(["train", *tiny(plain, data_dir, *common[:1], *common[2:])]) == 0
    assert train_losses(plain) != train_losses(straight)
    meta = json.loads((resumed / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["format"] == 3 and meta["seq_len"] == 32
