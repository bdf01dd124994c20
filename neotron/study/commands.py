"""The `neotron study` and `neotron plot` subcommands: arguments and handlers (cli.py
dispatches here; heavy imports happen only when the command runs)."""

from __future__ import annotations

import argparse

STUDY_HELP = ("run a scaling study (architectures x sizes x lrs): train what is not finished,"
              " write results.csv, report.md and plots into study_dir")
PLOT_HELP = "overlay the train and validation loss curves of runs into a PNG"


def add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study YAML file (docs/studies.md)")
    p.add_argument("overrides", nargs="*", help="key.path=value for the study file")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: collect results.csv and rebuild report.md and the plots")
    p.add_argument("--submit", action="store_true",
                   help="executor slurm: submit the array script with sbatch (default: only"
                   " write it)")


def add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--x", choices=["steps", "tokens", "flops"], default="steps",
                   help="x axis (flops: training FLOPs from each run's config.yaml)")
    p.add_argument("--out", default="loss_curves.png", help="PNG file (default loss_curves.png)")


def cmd_study(args: argparse.Namespace) -> int:
    from neotron.study.runner import run_study

    return run_study(args.study, args.overrides, submit=args.submit,
                     report_only=args.report_only)


def cmd_plot(args: argparse.Namespace) -> int:
    from neotron.study.plot import plot_runs

    print(plot_runs(args.run_dirs, args.out, x=args.x))
    return 0
