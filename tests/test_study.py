"""`neotron study` end to end in real processes (2 architectures x 2 sizes, a few steps each):
an interrupted study (a training process SIGKILLed mid-run by fault injection) resumes on the
next invocation, skipping finished runs and continuing the killed one from its checkpoint;
results.csv, report.md and the PNGs are written. Also: the token budget rule against a
parameter count made here, one-line errors for bad study files, the Slurm array script and its
submission, and `neotron plot`."""

import csv
import math
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from neotron.cli import main
from tests.conftest import ROOT, run_cli

DEMO = ROOT / "configs" / "demo"
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_study(tmp: Path, data_dir: Path, **extra) -> Path:
    """llama and deltanet at dims 16 and 32: the budget (0.1 tokens per non-embedding
    parameter) gives 4 and 13 steps (llama), 4 and 14 steps (deltanet)."""
    spec = {
        "study_dir": str(tmp / "study"),
        "budget": {"tokens_per_param": 0.1},
        "fit": {"resamples": 50},
        "overrides": [
            f"data.dir={data_dir}", "data.tokenizer.vocab_size=512", "data.seq_len=32",
            "model.vocab_size=512", "model.max_seq_len=32", "model.n_layers=2",
            "train.global_batch_tokens=256", "train.micro_batch_size=8",
            "optim.schedule.warmup_steps=1", "eval.every=4", "eval.batches=2",
            "eval.batch_size=4", "eval.at_start=false", "checkpoint.every=4", "log.every=1",
            "log.tensorboard=false",
        ],
        "architectures": [
            {"name": "llama", "config": str(DEMO / "llama.yaml"),
             "overrides": ["model.blocks.attention.mixer.n_heads=2",
                           "model.blocks.attention.mixer.n_kv_heads=1"],
             "sizes": [{"name": "d16", "overrides": ["model.dim=16"]},
                       {"name": "d32", "overrides": ["model.dim=32"]}]},
            {"name": "deltanet", "config": str(DEMO / "deltanet.yaml"),
             "overrides": ["model.blocks.deltanet.mixer.n_heads=2"],
             "sizes": [{"name": "d16", "overrides": ["model.dim=16"]},
                       {"name": "d32", "overrides": ["model.dim=32"]}]},
        ],
        **extra,
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _non_embedding_params(config: Path, overrides: list[str]) -> int:
    """Counted here from a built model: every parameter but the (tied) token embedding."""
    from neotron.arch import build_model
    from neotron.config import load

    model = build_model(load(config, overrides).model)
    return sum(p.numel() for n, p in model.named_parameters() if n != "embed.weight")


@pytest.mark.slow
def test_study_runs_resumes_after_a_kill_and_reports(tmp_path, data_dir):
    study = tiny_study(tmp_path, data_dir)
    sdir = tmp_path / "study"
    # First invocation: every training process SIGKILLs itself before step 14, so the three
    # runs with <= 13 steps finish and deltanet-d32 (14 steps) dies after its step-12 checkpoint.
    first = run_cli("study", str(study), env={"NEOTRON_FAULT_KILL": "14", "OMP_NUM_THREADS": "1"})
    assert first.returncode == 1, first.stdout + first.stderr
    assert "deltanet-d32: FAILED" in first.stdout
    rows = {r["run"]: r for r in csv.DictReader(open(sdir / "results.csv"))}
    assert [rows[n]["status"] for n in ("llama-d16", "llama-d32", "deltanet-d16")] == ["done"] * 3
    assert rows["deltanet-d32"]["status"] == "partial"
    finished = {n: (sdir / "runs" / n / "metrics.jsonl").read_bytes()
                for n in ("llama-d16", "llama-d32", "deltanet-d16")}

    second = run_cli("study", str(study), env={"OMP_NUM_THREADS": "1"})
    assert second.returncode == 0, second.stdout + second.stderr
    for n in finished:
        assert f"{n}: finished earlier" in second.stdout
        assert (sdir / "runs" / n / "metrics.jsonl").read_bytes() == finished[n]  # untouched
    killed = sdir / "runs" / "deltanet-d32"
    assert "deltanet-d32: resuming" in second.stdout
    assert "resumed from" in (killed / "train.log").read_text()
    assert "(step 12)" in (killed / "train.log").read_text()
    steps = [yaml.safe_load(line)["step"] for line in (killed / "metrics.jsonl").read_text()
             .splitlines() if '"loss"' in line]
    assert steps == list(range(1, 15))  # continued, not restarted: each step once
    assert len((killed / "study_legs.txt").read_text().split()) == 2

    rows = list(csv.DictReader(open(sdir / "results.csv")))
    assert [r["run"] for r in rows] == ["llama-d16", "llama-d32", "deltanet-d16", "deltanet-d32"]
    for r in rows:
        assert r["status"] == "done" and 4 < float(r["val_loss"]) < math.log(512) + 0.5
        arch_cfg = DEMO / f"{r['arch']}.yaml"
        spec = yaml.safe_load(study.read_text())
        arch = next(a for a in spec["architectures"] if a["name"] == r["arch"])
        size = next(s for s in arch["sizes"] if s["name"] == r["size"])
        n = _non_embedding_params(arch_cfg, [*arch["overrides"], *size["overrides"],
                                             *spec["overrides"]])
        assert int(r["params_non_embedding"]) == n
        assert int(r["steps"]) == math.ceil(0.1 * n / 256)  # the budget rule
        assert int(r["tokens"]) == int(r["steps"]) * 256
        assert float(r["flops"]) == pytest.approx(float(r["flops_per_token"]) * int(r["tokens"]))
        assert float(r["wall_time_s"]) > 0 and r["fitted"] == "True"
    report = (sdir / "report.md").read_text()
    assert "## Runs" in report and "not enough points to fit" in report  # 2 sizes: no curve
    for png in ("loss_vs_flops.png", "loss_curves.png"):
        assert (sdir / png).read_bytes()[:8] == PNG

    # A third invocation trains nothing.
    third = run_cli("study", str(study), "--report-only", env={"OMP_NUM_THREADS": "1"})
    assert third.returncode == 0 and "training" not in third.stdout


def _err(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_study_files_are_one_line_errors(tmp_path, data_dir, capsys, fresh_logging):
    study = str(tiny_study(tmp_path, data_dir))
    assert "budget.tokns: unknown key; did you mean 'tokens'" in _err(
        capsys, "study", study, "budget.tokns=5")
    assert "exactly one of budget.tokens and budget.tokens_per_param" in _err(
        capsys, "study", study, "budget.tokens=1000")
    assert "baseline: 'gpt' is not one of the architectures" in _err(
        capsys, "study", study, "baseline=gpt")
    assert "architectures.1.name: 'llama' is used twice" in _err(
        capsys, "study", study, "architectures.1.name=llama")
    assert "study run llama-d16" in _err(capsys, "study", study,
                                         "architectures.0.sizes.0.overrides=[model.dim=abc]")
    assert "config file not found" in _err(capsys, "study", study,
                                           "architectures.0.config=nope.yaml")
    assert "executor" in _err(capsys, "study", study, "executor=cloud")
    assert "lr_multipliers.1: Input should be greater than 0" in _err(
        capsys, "study", study, "lr_multipliers=[1,-1]")
    assert "--submit applies to executor: slurm" in _err(capsys, "study", study, "--submit")
    assert "config file not found" in _err(capsys, "study", str(tmp_path / "missing.yaml"))


def test_a_changed_study_refuses_to_reuse_a_run(tmp_path, data_dir, capsys, fresh_logging):
    from neotron.study.runner import write_configs
    from neotron.study.spec import load_study

    study = tiny_study(tmp_path, data_dir)
    run = load_study(study).runs[0]
    run.run_dir.mkdir(parents=True)
    saved = yaml.safe_load(open(write_configs(load_study(study))[0]))
    saved["optim"]["lr"] = 1.0
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    (run.run_dir / "metrics.jsonl").write_text("")
    err = _err(capsys, "study", str(study), "--report-only")
    assert "llama-d16" in err and "optim.lr: 1.0 in the run" in err


def test_slurm_array_script_is_written_and_submitted_on_request(tmp_path, data_dir, capsys,
                                                               fresh_logging, monkeypatch):
    study = str(tiny_study(tmp_path, data_dir, executor="slurm",
                           slurm={"max_parallel": 2, "sbatch_args": ["--partition=gpu"]}))
    assert main(["study", study, "lr_multipliers=[0.5,1]"]) == 0
    out = capsys.readouterr().out
    script = tmp_path / "study" / "slurm" / "study.sbatch"
    assert f"submit it with: sbatch {script}" in out
    text = script.read_text()
    assert "#SBATCH --array=0-7%2" in text and "#SBATCH --partition=gpu" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # valid bash
    lines = (tmp_path / "study" / "slurm" / "runs.txt").read_text().splitlines()
    assert len(lines) == 8 and lines[0].split("\t")[1].endswith("runs/llama-d16-lrx0.5")
    cfg0 = yaml.safe_load(open(lines[0].split("\t")[0]))
    base_lr = yaml.safe_load(open(DEMO / "llama.yaml"))["optim"]["lr"]
    assert cfg0["optim"]["lr"] == pytest.approx(0.5 * base_lr)
    assert str(ROOT / "neotron" / "launch" / "slurm.sbatch") in text
    # One array task, run as Slurm would (stand-ins for scontrol and srun on PATH): it hands
    # its run's config to the launch template and records its wall time.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (fake / "srun").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/srun.args\n")
    for f in ("scontrol", "srun"):
        (fake / f).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
           "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_ID": "7"}
    task = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert task.returncode == 0, task.stderr
    srun = (tmp_path / "srun.args").read_text()
    assert "torchrun" in srun and f"-m neotron train {lines[1].split(chr(9))[0]}" in srun
    legs = Path(lines[1].split("\t")[1]) / "study_legs.txt"
    assert len(legs.read_text().split()) == 1
    # --submit calls sbatch (a stand-in that records its arguments)
    (fake / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/sbatch.args\n"
                                 "echo Submitted batch job 42\n")
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert main(["study", study, "lr_multipliers=[0.5,1]", "--submit"]) == 0
    assert "Submitted batch job 42" in capsys.readouterr().out
    assert (tmp_path / "sbatch.args").read_text().strip() == str(script)


def test_plot_writes_a_png_of_any_runs(tmp_path, trained_run, capsys, fresh_logging):
    out = tmp_path / "curves.png"
    for x in ("steps", "flops"):
        assert main(["plot", str(trained_run), str(trained_run), "--x", x, "--out", str(out)]) == 0
        assert out.read_bytes()[:8] == PNG
        out.unlink()
    assert "not a run directory" in _err(capsys, "plot", str(tmp_path), "--out", str(out))


STUDIES = sorted((ROOT / "configs" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_plan(path):
    """Every shipped study validates and expands into runs whose configs validate (models
    built on the meta device), with at least 3 sizes per architecture and >= 3 architectures
    for the CPU demo."""
    from neotron.study.spec import load_study

    study = load_study(path)
    sizes = {}
    for run in study.runs:
        sizes.setdefault(run.arch, set()).add(run.size)
        assert run.cfg.train.steps >= 1 and run.flops > 0
    assert all(len(s) >= 3 for s in sizes.values()), sizes
    if path.stem == "demo":
        assert "llama" in sizes and len(sizes) >= 3 and study.spec.executor == "local"


def test_lr_sweep_fits_the_best_lr_per_size(tmp_path, data_dir):
    """With an lr sweep, exactly the lowest-loss lr of each (architecture, size) is `fitted`:
    the fit's points. Final val losses are written by hand (no training), so the winner is
    known: the x0.5 run for d16 and the x2 run for d32 (any other choice fails)."""
    import json

    from neotron.study.results import collect
    from neotron.study.spec import load_study

    study = load_study(tiny_study(tmp_path, data_dir), ["lr_multipliers=[0.5,1,2]"])
    want = {("d16", 0.5), ("d32", 2.0)}
    for run in study.runs:
        loss = 3.0 if (run.size, run.lr_multiplier) in want else 4.0 + run.lr_multiplier
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "metrics.jsonl").write_text(json.dumps(
            {"step": run.cfg.train.steps, "tokens": run.tokens, "val_loss": loss}) + "\n")
    rows = collect(study)
    assert len(rows) == 12 and all(r["status"] == "done" for r in rows)
    fitted = {(r["arch"], r["size"], r["lr_multiplier"]) for r in rows if r["fitted"]}
    assert fitted == {(a, s, m) for a in ("llama", "deltanet") for s, m in want}
    base = {r["arch"]: r["lr"] / r["lr_multiplier"] for r in rows}
    assert all(r["lr"] == pytest.approx(base[r["arch"]] * r["lr_multiplier"]) for r in rows)
