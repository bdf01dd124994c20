"""PNG plots (matplotlib, Agg backend: no display needed): loss curves of any runs
(`neotron plot`), and a study's loss-vs-compute fits and iso-FLOP gaps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neotron.errors import UsageError
from neotron.study.fit import FitResult, relative_gap
from neotron.study.results import Curves, read_curves

X_LABELS = {"steps": "optimizer step", "tokens": "training tokens",
            "flops": "training compute (FLOPs, forward + backward)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # before pyplot is imported anywhere: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _log_loss_axis(ax) -> None:
    """Log-scale loss axis with plain tick labels (5.9, 6, 6.1; not 6x10^0): losses of a
    study span a small factor, so the minor ticks carry the labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    fmt = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    ax.yaxis.set_minor_formatter(fmt)


def run_flops_per_token(run_dir: Path) -> float:
    """Training FLOPs per token of a run, from the config it saved (model built on meta)."""
    from neotron.arch import build_model
    from neotron.arch.accounting import flops_per_token
    from neotron.config import load

    cfg = load(run_dir / "config.yaml")
    return flops_per_token(build_model(cfg.model), cfg.data.seq_len)


def _xs(points: list[tuple[int, int, float]], x: str, fpt: float) -> list[float]:
    if x == "steps":
        return [s for s, _, _ in points]
    if x == "tokens":
        return [t for _, t, _ in points]
    return [t * fpt for _, t, _ in points]


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """The shortest trailing path that tells the runs apart (usually the directory name)."""
    for depth in range(1, 6):
        labels = ["/".join(p.resolve().parts[-depth:]) for p in run_dirs]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in run_dirs]


def _draw_curves(ax, curves: Curves, x: str, fpt: float, color, label: str) -> None:
    train = [p for p in curves.train if x != "flops" or p[1] > 0]
    val = [p for p in curves.val if x == "steps" or p[1] > 0]  # step 0 has no place on log x
    if train:
        ax.plot(_xs(train, x, fpt), [v for *_, v in train], color=color, alpha=0.45, lw=1,
                label=f"{label} train")
    if val:
        ax.plot(_xs(val, x, fpt), [v for *_, v in val], color=color, lw=1.8, ls="--",
                marker="o", ms=3.5, label=f"{label} val")


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, x: str = "steps") -> Path:
    """Overlay the train and validation loss curves of runs; write a PNG to `out`."""
    if x not in X_LABELS:
        raise UsageError(f"--x must be one of {', '.join(X_LABELS)}, got '{x}'")
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not (d / "metrics.jsonl").is_file():
            raise UsageError(f"{d}: not a run directory (no metrics.jsonl)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.cm.tab10.colors
    for i, (d, label) in enumerate(zip(dirs, _labels(dirs))):
        fpt = run_flops_per_token(d) if x == "flops" else 0.0
        _draw_curves(ax, read_curves(d), x, fpt, colors[i % len(colors)], label)
    if x == "flops":
        ax.set_xscale("log")
    elif x == "tokens":
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1.5M rather than 1500000
    _log_loss_axis(ax)
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("loss (nats/token, log scale)")
    ax.set_title("training loss (thin) and validation loss (dashed, markers)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper right", ncol=1 if len(dirs) <= 4 else 2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _fmt_law(fit: FitResult) -> str:
    law = fit.law
    return f"L = {law.a:.3g}·C^-{law.b:.3f} + {law.c:.3f}"


def plot_fits(points: dict[str, tuple[list[float], list[float], list[str]]],
              others: dict[str, tuple[list[float], list[float]]],
              fits: dict[str, FitResult], out: Path, level: float = 0.95) -> Path:
    """Final validation loss against training compute per architecture, with each fitted law
    and its pointwise bootstrap band. `points[arch] = (flops, losses, size names)` are the
    fitted runs; `others` the rest of an lr sweep (drawn faint)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = plt.cm.tab10.colors
    all_c = [c for cs, _, _ in points.values() for c in cs] or [1.0]
    grid = np.geomspace(min(all_c) / 1.5, max(all_c) * 1.5, 200)
    tail = 100 * (1 - level) / 2
    for i, (arch, (cs, ls, names)) in enumerate(points.items()):
        color = colors[i % len(colors)]
        fit = fits.get(arch)
        if fit is not None and fit.law is not None:
            label = f"{arch}: {_fmt_law(fit)}"
            ax.plot(grid, fit.law(grid), color=color, lw=1.6)
            if fit.boots:
                curves = np.array([b(grid) for b in fit.boots])
                lo, hi = np.percentile(curves, [tail, 100 - tail], axis=0)
                ax.fill_between(grid, lo, hi, color=color, alpha=0.15, lw=0)
        else:
            label = f"{arch}: no fit ({len(cs)} points)"
        ax.scatter(cs, ls, color=color, s=36, zorder=3, label=label)
        offset = [(5, 4), (5, -11), (-22, 4), (-22, -11)][i % 4]  # archs' labels apart
        for c, v, n in zip(cs, ls, names):
            ax.annotate(n, (c, v), textcoords="offset points", xytext=offset, fontsize=7,
                        color=color)
        if arch in others and others[arch][0]:
            ax.scatter(*others[arch], color=color, s=14, marker="x", alpha=0.5, zorder=2)
    ax.set_xscale("log")
    _log_loss_axis(ax)
    ax.set_xlabel("training compute C (FLOPs, forward + backward)")
    ax.set_ylabel("final validation loss (nats/token, log scale)")
    ax.set_title(f"loss vs compute: fitted L(C) = a·C^-b + c, shaded {level:.0%} bootstrap band"
                 + ("; x = other learning rates" if any(o[0] for o in others.values()) else ""),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_gaps(fits: dict[str, FitResult], baseline: str, lo: float, hi: float, out: Path,
              level: float = 0.95, measured_hi: float | None = None) -> Path | None:
    """Iso-FLOP gap to the baseline, (L_arch(C) / L_base(C) - 1) in percent, with its paired
    bootstrap band, over [lo, hi] FLOPs; compute above `measured_hi` (where some
    architecture's fit runs past its largest run) is shaded as extrapolation. None when the baseline or every other arch is unfit."""
    base = fits.get(baseline)
    others = {a: f for a, f in fits.items() if a != baseline and f.law is not None}
    if base is None or base.law is None or not others:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.cm.tab10.colors
    grid = np.geomspace(lo, hi, 120)
    tail = 100 * (1 - level) / 2
    names = list(fits)
    for arch, fit in others.items():
        color = colors[names.index(arch) % len(colors)]
        ax.plot(grid, [relative_gap(fit.law, base.law, c) for c in grid], color=color,
                lw=1.6, label=arch)
        pairs = list(zip(fit.boots, base.boots))
        if pairs:
            gaps = np.array([[relative_gap(a, b, c) for c in grid] for a, b in pairs])
            band = np.percentile(gaps, [tail, 100 - tail], axis=0)
            ax.fill_between(grid, band[0], band[1], color=color, alpha=0.15, lw=0)
    ax.axhline(0, color="black", lw=0.8)
    if measured_hi is not None and measured_hi < hi:
        # Readers take a curve at face value: mark where no run was trained.
        ax.axvspan(measured_hi, hi, color="0.5", alpha=0.12, lw=0,
                   label="extrapolated (past some architecture's largest run)")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(f"loss vs {baseline} at equal compute (%)\n< 0: lower loss than {baseline}")
    ax.set_title(f"iso-FLOP gap to {baseline} from the fits, shaded {level:.0%} bootstrap band",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_study_curves(groups: dict[str, list[tuple[str, Path, float]]], out: Path) -> Path:
    """Loss curves of every run of a study against training FLOPs: one panel per architecture,
    one colour per size. `groups[arch] = [(label, run_dir, flops_per_token), ...]`."""
    plt = _pyplot()
    n = max(len(groups), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False,
                             sharey=True)
    colors = plt.cm.tab10.colors  # the i-th size of every panel has the same colour
    for ax, (arch, runs) in zip(axes.flat, groups.items()):
        for i, (label, run_dir, fpt) in enumerate(runs):
            _draw_curves(ax, read_curves(run_dir), "flops", fpt, colors[i % 10], label)
        ax.set_xscale("log")
        _log_loss_axis(ax)
        ax.set_title(arch)
        ax.set_xlabel("training compute (FLOPs)")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes[:, 0]:
        ax.set_ylabel("loss (nats/token, log scale)")
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.suptitle("loss curves: training (thin) and validation (dashed, markers)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
