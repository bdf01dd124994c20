"""What a run directory says about a run (its loss curves, whether it finished), and the
study's results table, `study_dir/results.csv`: one row per planned run."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from neotron.study.spec import RunPlan, Study

LEGS_FILE = "study_legs.txt"  # wall seconds of each training leg (a resume adds a line)

COLUMNS = ["run", "arch", "size", "lr", "lr_multiplier", "status", "steps", "tokens", "flops",
           "flops_per_token", "params_total", "params_active", "params_non_embedding",
           "params_embedding", "val_loss", "wall_time_s", "fitted", "run_dir"]


@dataclass
class Curves:
    """A run's logged losses: (step, tokens, loss) triples, train and validation."""

    train: list[tuple[int, int, float]]
    val: list[tuple[int, int, float]]


def read_curves(run_dir: str | Path) -> Curves:
    path = Path(run_dir) / "metrics.jsonl"
    train: list[tuple[int, int, float]] = []
    val: list[tuple[int, int, float]] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
            if r.get("loss") is not None:
                train.append((r["step"], r.get("tokens", 0), float(r["loss"])))
            if r.get("val_loss") is not None:
                val.append((r["step"], r.get("tokens", 0), float(r["val_loss"])))
    return Curves(train=train, val=val)


def run_status(run: RunPlan) -> tuple[str, float | None]:
    """("done", final val loss) once the run evaluated at its last step; ("partial", None)
    when it has a checkpoint to resume from; ("pending", None) otherwise."""
    curves = read_curves(run.run_dir)
    final = [v for s, _, v in curves.val if s == run.cfg.train.steps]
    if final:
        return "done", final[-1]
    if (run.run_dir / "checkpoints" / "latest").is_file():
        return "partial", None
    return "pending", None


def wall_time(run_dir: Path) -> float | None:
    path = run_dir / LEGS_FILE
    if not path.is_file():
        return None
    legs = [float(x) for x in path.read_text().split() if x.strip()]
    return sum(legs) if legs else None


def add_leg(run_dir: Path, seconds: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LEGS_FILE, "a") as f:
        f.write(f"{seconds:.1f}\n")


def collect(study: Study) -> list[dict]:
    """One row per planned run; `fitted` marks the lr whose final loss is best for its
    (architecture, size): those rows are what the fits use."""
    rows = []
    for run in study.runs:
        status, val = run_status(run)
        rows.append({
            "run": run.name, "arch": run.arch, "size": run.size, "lr": run.lr,
            "lr_multiplier": run.lr_multiplier, "status": status, "steps": run.cfg.train.steps,
            "tokens": run.tokens, "flops": run.flops, "flops_per_token": run.flops_per_token,
            "params_total": run.params_total, "params_active": run.params_active,
            "params_non_embedding": run.params_non_embedding,
            "params_embedding": run.params_embedding, "val_loss": val,
            "wall_time_s": wall_time(run.run_dir), "fitted": False, "run_dir": str(run.run_dir),
        })
    best: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row["val_loss"] is None:
            continue
        key = (row["arch"], row["size"])
        if key not in best or row["val_loss"] < best[key]["val_loss"]:
            best[key] = row
    for row in best.values():
        row["fitted"] = True
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row[k] is None else row[k]) for k in COLUMNS})
    tmp.replace(path)
