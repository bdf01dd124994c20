"""Learning-rate sweep of optimizers on a config, at an equal number of steps.

    python bench/lr_sweep.py configs/demo/llama.yaml \
        --grid adamw=1e-3,3e-3,6e-3 muon=3e-3,1e-2,2e-2 normuon=3e-3,1e-2,2e-2 [overrides ...]

Each point is one `neotron train` run in a fresh process (run_dir under --out); the table
reports each run's final validation loss and marks the best learning rate per optimizer.
Runs that already finished are read back, not repeated, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def final_val_loss(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    vals = [json.loads(line) for line in path.read_text().splitlines()]
    vals = [r["val_loss"] for r in vals if "val_loss" in r]
    return vals[-1] if vals else None


def train_once(config: str, overrides: list[str], run_dir: Path, label: str) -> float | None:
    """One `neotron train` run in a fresh process, unless `run_dir` already finished (then it
    is read back, so an interrupted sweep resumes); its final validation loss, None if failed.
    Prints `label`, the status and the time."""
    if not (run_dir / "checkpoints" / "latest").is_file():
        cmd = [sys.executable, "-m", "neotron", "train", config, *overrides,
               f"run_dir={run_dir}", "checkpoint.every=0", "checkpoint.resume=never",
               "log.tensorboard=false"]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
        print(f"{label} {status} in {time.time() - t0:.0f}s", flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
    return final_val_loss(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key.path=value applied to every run")
    parser.add_argument("--grid", nargs="+", required=True, help="optimizer=lr1,lr2,...")
    parser.add_argument("--out", default="runs/lr_sweep")
    args = parser.parse_args()

    results: dict[str, dict[float, float | None]] = {}
    for spec in args.grid:
        name, _, lrs = spec.partition("=")
        for lr in (float(x) for x in lrs.split(",")):
            run_dir = Path(args.out) / f"{name}-lr{lr:g}"
            results.setdefault(name, {})[lr] = train_once(
                args.config, [*args.overrides, f"optim.name={name}", f"optim.lr={lr}"], run_dir,
                f"{name:8s} lr={lr:<8g}")

    print(f"\n{'optimizer':10s} {'lr':>10s} {'final val_loss':>15s}")
    for name, by_lr in results.items():
        finite = {lr: v for lr, v in by_lr.items() if v is not None}
        best = min(finite, key=finite.get) if finite else None
        for lr, v in by_lr.items():
            shown = f"{v:.4f}" if v is not None else "failed"
            print(f"{name:10s} {lr:>10g} {shown:>15s}{'  <- best' if lr == best else ''}")


if __name__ == "__main__":
    main()
