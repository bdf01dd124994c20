"""`neotron study STUDY.yaml [key=value ...]`: plan the runs, train what is not finished, collect
`results.csv`, write `report.md` and the plots.

- Every run's resolved config is written to `study_dir/configs/<run>.yaml`; a run is one
  `neotron train` of that file, so the trainer's own resume applies: a finished run is skipped,
  an interrupted one continues from its latest checkpoint.
- `executor: local` trains the runs one after another in child processes on this machine,
  printing a line per run and the child's evaluation lines; its full output goes to
  `<run_dir>/train.log`. SIGTERM/SIGINT reach the current child, which checkpoints and stops;
  the study stops after it (rerun the same command to continue).
- `executor: slurm` writes `study_dir/slurm/study.sbatch`, one array task per unfinished run
  (built on neotron/launch/study_array.sbatch, which runs neotron/launch/slurm.sbatch), and
  submits it only with `--submit`. Afterwards `--report-only` collects and reports.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from neotron.config import to_yaml
from neotron.errors import UsageError
from neotron.study.report import write_report
from neotron.study.results import add_leg, collect, run_status, write_csv
from neotron.study.spec import RunPlan, Study, load_study

# Settings a rerun must not change under a run that already started (the rest, e.g. eval or
# logging cadence, may change between legs as in any resumed run).
_FROZEN = ("model", "data", "optim", "train.steps", "train.seed", "train.global_batch_tokens")


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k, {}) if isinstance(d, dict) else {}
    return d


def _first_difference(a, b, prefix: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
            if diff:
                return diff
        return None
    return None if a == b else f"{prefix}: {a!r} in the run, {b!r} in the study"


def write_configs(study: Study) -> list[Path]:
    """Write each run's resolved config; refuse a run directory trained with other settings."""
    cfg_dir = study.dir / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for run in study.runs:
        new = yaml.safe_load(to_yaml(run.cfg))
        saved = run.run_dir / "config.yaml"
        if saved.is_file() and (run.run_dir / "metrics.jsonl").is_file():
            old = yaml.safe_load(saved.read_text())
            for key in _FROZEN:
                diff = _first_difference(_get(old, key), _get(new, key), key)
                if diff:
                    raise UsageError(f"study run {run.name}: {run.run_dir} was trained with"
                                     f" other settings ({diff}); delete it or change study_dir")
        path = cfg_dir / f"{run.name}.yaml"
        path.write_text(to_yaml(run.cfg))
        paths.append(path)
    return paths


def _summary(run: RunPlan) -> str:
    return (f"{run.params_non_embedding / 1e6:.2f}M non-emb params, {run.tokens:,} tokens"
            f" ({run.cfg.train.steps} steps), {run.flops:.3g} FLOPs, lr {run.lr:.3g}")


class _Forward:
    """While a child trains, SIGTERM/SIGINT are passed on to it as SIGTERM (it checkpoints and
    exits 0) and the study stops after it."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.requested = ""
        self._old: dict[int, object] = {}

    def __enter__(self) -> _Forward:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def _train(run: RunPlan, config: Path, fwd: _Forward) -> int:
    """One training leg in a child process; its output appended to run_dir/train.log, its
    evaluation lines (and errors) echoed with the run's name."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "neotron", "train", str(config)]
    t0 = time.time()
    with open(run.run_dir / "train.log", "a", buffering=1) as log:  # tail -f works
        log.write(f"$ {shlex.join(cmd)}\n")
        fwd.child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        tail: list[str] = []
        assert fwd.child.stdout is not None
        for line in fwd.child.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-15:]
            if (line.startswith("step") and "val_loss" in line) \
                    or line.startswith(("resumed from", "stopping at")):
                print(f"  {run.name}: {line.rstrip()}", flush=True)
        rc = fwd.child.wait()
    fwd.child = None
    add_leg(run.run_dir, time.time() - t0)
    if rc != 0:
        print("\n".join(f"  {run.name}| {t}" for t in tail), file=sys.stderr, flush=True)
    return rc


def run_local(study: Study, configs: list[Path]) -> tuple[list[str], bool]:
    """Train every unfinished run in turn. Returns (names of failed runs, interrupted)."""
    n = len(study.runs)
    failed: list[str] = []
    with _Forward() as fwd:
        for i, (run, config) in enumerate(zip(study.runs, configs), 1):
            status, val = run_status(run)
            if status == "done":
                print(f"[{i}/{n}] {run.name}: finished earlier (val_loss {val:.4f}), skipped",
                      flush=True)
                continue
            what = "resuming" if status == "partial" else "training"
            print(f"[{i}/{n}] {run.name}: {what}: {_summary(run)}", flush=True)
            t0 = time.time()
            rc = _train(run, config, fwd)
            status, val = run_status(run)
            if status == "done":
                print(f"[{i}/{n}] {run.name}: done in {time.time() - t0:.0f}s, val_loss"
                      f" {val:.4f}", flush=True)
            elif fwd.requested:
                print(f"[{i}/{n}] {run.name}: stopped ({fwd.requested}); rerun the same command"
                      " to resume", flush=True)
            else:
                failed.append(run.name)
                print(f"[{i}/{n}] {run.name}: FAILED (exit status {rc}); log:"
                      f" {run.run_dir / 'train.log'}", flush=True)
            if fwd.requested:
                return failed, True
    return failed, False


def _launch_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "launch"


def write_slurm(study: Study, configs: list[Path]) -> Path | None:
    """The array script for the unfinished runs; None when every run is finished."""
    todo = [(r, c) for r, c in zip(study.runs, configs) if run_status(r)[0] != "done"]
    if not todo:
        return None
    sdir = study.dir / "slurm"
    sdir.mkdir(parents=True, exist_ok=True)
    runs_file = sdir / "runs.txt"
    runs_file.write_text("".join(f"{c.resolve()}\t{r.run_dir.resolve()}\n" for r, c in todo))
    s = study.spec.slurm
    n = len(todo)
    array = f"0-{n - 1}" + (f"%{s.max_parallel}" if s.max_parallel else "")
    header = [
        f"#SBATCH --job-name=study-{study.path.stem}",
        f"#SBATCH --array={array}",
        f"#SBATCH --nodes={s.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={s.gpus_per_node}",
        f"#SBATCH --time={s.time}",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:TERM@300",
        f"#SBATCH --output={sdir.resolve()}/%x-%A_%a.out",
        f"#SBATCH --chdir={Path.cwd()}",  # relative paths in the configs mean what they meant here
        *(f"#SBATCH {a}" for a in s.sbatch_args),
    ]
    template = (_launch_dir() / "study_array.sbatch").read_text()
    script = (template.replace("#@SBATCH_HEADER@", "\n".join(header))
              .replace("@RUNS_FILE@", shlex.quote(str(runs_file.resolve())))
              .replace("@LAUNCH@", shlex.quote(str(_launch_dir() / "slurm.sbatch")))
              .replace("@GPUS_PER_NODE@", str(s.gpus_per_node))
              .replace("@PYTHON@", shlex.quote(sys.executable)))
    path = sdir / "study.sbatch"
    path.write_text(script)
    path.chmod(0o755)
    return path


def report(study: Study) -> Path:
    rows = collect(study)
    write_csv(rows, study.dir / "results.csv")
    return write_report(study, rows)


def run_study(path: str, overrides: list[str], *, submit: bool = False,
              report_only: bool = False) -> int:
    study = load_study(path, overrides)
    spec = study.spec
    print(f"study {path}: {len(study.runs)} runs ({len(spec.architectures)} architectures),"
          f" executor {spec.executor}, study_dir {study.dir}", flush=True)
    if submit and spec.executor != "slurm":
        raise UsageError("--submit applies to executor: slurm (this study runs locally)")
    configs = write_configs(study)
    failed: list[str] = []
    if not report_only:
        if spec.executor == "local":
            failed, interrupted = run_local(study, configs)
            if interrupted:
                report(study)
                return 130
        else:
            script = write_slurm(study, configs)
            if script is None:
                print("every run is finished; nothing to submit", flush=True)
            elif submit:
                proc = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise UsageError(f"sbatch {script} failed: {proc.stderr.strip()}")
                print(proc.stdout.strip(), flush=True)
                print(f"when the jobs are done: neotron study {path} --report-only", flush=True)
                return 0
            else:
                print(f"wrote {script}; submit it with: sbatch {script}   (or rerun with"
                      " --submit); then: neotron study"
                      f" {shlex.join([path, *overrides])} --report-only", flush=True)
                return 0
    out = report(study)
    rows_done = sum(run_status(r)[0] == "done" for r in study.runs)
    print(f"results: {study.dir / 'results.csv'} ({rows_done}/{len(study.runs)} runs finished);"
          f" report: {out}", flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to"
              " retry them", file=sys.stderr, flush=True)
        return 1
    return 0

