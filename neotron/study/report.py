"""`study_dir/report.md` and its plots, from the results table: the fitted law per
architecture with bootstrap intervals, an iso-FLOP comparison with the baseline, crossovers.

Every number in the report comes from results.csv (written beside it) and the fit in
neotron/study/fit.py; rerunning `neotron study STUDY.yaml --report-only` rebuilds it."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from neotron.study.fit import FitResult, crossovers, fit_with_bootstrap, paired, relative_gap
from neotron.study.plot import plot_fits, plot_gaps, plot_study_curves
from neotron.study.spec import Study

CROSSOVER_SPAN = 1e3  # look for crossovers from range_lo / 1e3 to range_hi * 1e3


def _si(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def _ci(lo: float, hi: float, fmt: str = "{:.3g}") -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "–"
    return f"[{fmt.format(lo)}, {fmt.format(hi)}]"


def _gap_words(pct: float) -> str:
    return f"{abs(pct):.2f}% {'below' if pct < 0 else 'above'}"


def fit_all(study: Study, rows: list[dict]) -> dict[str, FitResult]:
    fits = {}
    for arch in study.spec.architectures:
        pts = [r for r in rows if r["arch"] == arch.name and r["fitted"]]
        fits[arch.name] = fit_with_bootstrap([r["flops"] for r in pts],
                                             [r["val_loss"] for r in pts],
                                             n_resamples=study.spec.fit.resamples,
                                             seed=study.spec.fit.seed)
    return fits


def _iso_points(fa: FitResult, fb: FitResult) -> list[tuple[float, str]]:
    """Compute values to compare at: the ends and middle of the range both architectures were
    measured on, then 10x and 100x beyond it (marked as extrapolations)."""
    lo = max(fa.compute_range[0], fb.compute_range[0])
    hi = min(fa.compute_range[1], fb.compute_range[1])
    if not lo < hi:
        return []
    mid = math.sqrt(lo * hi)
    return [(lo, "measured range"), (mid, "measured range"), (hi, "measured range"),
            (hi * 10, "extrapolated"), (hi * 100, "extrapolated")]


def write_report(study: Study, rows: list[dict], out_dir: Path | None = None) -> Path:
    spec = study.spec
    out_dir = out_dir or study.dir
    out_dir.mkdir(parents=True, exist_ok=True)
    level = spec.fit.level
    fits = fit_all(study, rows)
    base = spec.baseline_name
    lines: list[str] = []
    add = lines.append
    add(f"# {spec.title or 'Scaling study ' + study.path.stem}")
    add("")
    done = [r for r in rows if r["status"] == "done"]
    add(f"Study file `{study.path}`, directory `{study.dir}`; {len(done)} of {len(rows)} runs"
        f" finished. Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by"
        f" `neotron study` (rebuild it with `neotron study {study.path} --report-only`).")
    b = spec.budget
    rule = (f"{_si(b.tokens)} tokens per run" if b.tokens is not None else
            f"{b.tokens_per_param:g} tokens per {b.param_count.replace('_', '-')} parameter")
    add(f"Budget: {rule}. Baseline: **{base}**. Compute C = training FLOPs per token (forward"
        " + backward, `neotron/arch/accounting.py`) x training tokens; loss = validation loss"
        " at the last step, nats/token.")
    add("")
    add("## Runs")
    add("")
    add("| run | lr | params total / active / non-emb. | tokens | FLOPs | val loss | wall time |"
        " status |")
    add("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mark = " (fitted)" if r["fitted"] and len({x["lr_multiplier"] for x in rows}) > 1 else ""
        wall = f"{r['wall_time_s']:.0f} s" if r["wall_time_s"] else "–"
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "–"
        add(f"| {r['run']}{mark} | {r['lr']:.3g} | {_si(r['params_total'])} /"
            f" {_si(r['params_active'])} / {_si(r['params_non_embedding'])} |"
            f" {_si(r['tokens'])} | {r['flops']:.3g} | {val} | {wall} | {r['status']} |")
    add("")
    add("## Fits: L(C) = a·C^(-b) + c")
    add("")
    add(f"Least squares on the loss (variable projection over b; a, c >= 0). Intervals:"
        f" {level:.0%} percentile bootstrap over the runs (resampled with replacement,"
        f" {spec.fit.resamples} resamples, seed {spec.fit.seed}; resamples with fewer than 3"
        " distinct compute values are dropped). With few points the intervals are wide: that"
        " is the data speaking.")
    add("")
    add(f"| architecture | points | a [{level:.0%} CI] | b [{level:.0%} CI] | c [{level:.0%} CI] |"
        " usable resamples |")
    add("|---|---|---|---|---|---|")
    for arch, fit in fits.items():
        if fit.law is None:
            add(f"| {arch} | {fit.n_points} | {fit.reason} | | | |")
            continue
        law = fit.law
        add(f"| {arch} | {fit.n_points} | {law.a:.4g} {_ci(*fit.interval(lambda x: x.a, level))}"
            f" | {law.b:.4f} {_ci(*fit.interval(lambda x: x.b, level), '{:.4f}')}"
            f" | {law.c:.4f} {_ci(*fit.interval(lambda x: x.c, level), '{:.4f}')}"
            f" | {len(fit.boots)} of {fit.n_resamples} |")
    add("")
    points = {a.name: ([r["flops"] for r in rows if r["arch"] == a.name and r["fitted"]],
                       [r["val_loss"] for r in rows if r["arch"] == a.name and r["fitted"]],
                       [r["size"] for r in rows if r["arch"] == a.name and r["fitted"]])
              for a in spec.architectures}
    others = {a.name: ([r["flops"] for r in rows if r["arch"] == a.name and not r["fitted"]
                        and r["val_loss"] is not None],
                       [r["val_loss"] for r in rows if r["arch"] == a.name and not r["fitted"]
                        and r["val_loss"] is not None])
              for a in spec.architectures}
    if any(p[0] for p in points.values()):
        plot_fits(points, others, fits, out_dir / "loss_vs_flops.png", level)
        add("![validation loss against training compute](loss_vs_flops.png)")
        add("")
    _iso_section(add, fits, base, level, out_dir)
    groups: dict[str, list[tuple[str, Path, float]]] = {}
    for r, run in zip(rows, study.runs):
        if r["status"] != "pending":
            groups.setdefault(r["arch"], []).append(
                (run.name.removeprefix(run.arch + "-"), run.run_dir, run.flops_per_token))
    if groups:
        plot_study_curves(groups, out_dir / "loss_curves.png")
        add("## Loss curves")
        add("")
        add("![loss curves per run](loss_curves.png)")
        add("")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _iso_section(add, fits: dict[str, FitResult], base: str, level: float, out_dir: Path) -> None:
    add(f"## Iso-FLOP comparison with {base}")
    add("")
    fb = fits[base]
    if fb.law is None:
        add(f"No comparison: the baseline {base} has no fit ({fb.reason}).")
        add("")
        return
    add(f"At equal training compute C, each architecture's fitted loss relative to {base}'s,"
        f" (L_arch(C) / L_{base}(C) - 1); the interval pairs bootstrap draw i of one fit with"
        f" draw i of the other (the two are resampled independently).")
    add("")
    add(f"| architecture | C (FLOPs) | where | L_arch | L_{base} | difference | {level:.0%} CI |")
    add("|---|---|---|---|---|---|---|")
    spans = []
    for arch, fa in fits.items():
        if arch == base:
            continue
        if fa.law is None:
            add(f"| {arch} | | | | | {fa.reason} | |")
            continue
        for c, where in _iso_points(fa, fb):
            pct = relative_gap(fa.law, fb.law, c)
            lo, hi, _ = paired(fa, fb, lambda x, y, c=c: relative_gap(x, y, c), level)
            ci = (f"{_gap_words(lo)} to {_gap_words(hi)}" if math.isfinite(lo) else "–")
            add(f"| {arch} | {c:.3g} | {where} | {float(fa.law(c)):.4f} |"
                f" {float(fb.law(c)):.4f} | {_gap_words(pct)} | {ci} |")
        spans.append(fa.compute_range)
    add("")
    # sentences a reader can quote
    for arch, fa in fits.items():
        if arch == base or fa.law is None:
            continue
        pts = _iso_points(fa, fb)
        if not pts:
            continue
        c = pts[2][0]
        pct = relative_gap(fa.law, fb.law, c)
        lo, hi, _ = paired(fa, fb, lambda x, y, c=c: relative_gap(x, y, c), level)
        ci = f" ({level:.0%} CI: {_gap_words(lo)} to {_gap_words(hi)})" if math.isfinite(lo) else ""
        add(f"- At {c:.3g} FLOPs, {arch}'s loss is {_gap_words(pct)} {base}'s{ci}.")
    add("")
    add("### Predicted crossover")
    add("")
    for arch, fa in fits.items():
        if arch == base or fa.law is None:
            continue
        lo_c = min(fa.compute_range[0], fb.compute_range[0]) / CROSSOVER_SPAN
        hi_c = max(fa.compute_range[1], fb.compute_range[1]) * CROSSOVER_SPAN
        found = crossovers(fa.law, fb.law, lo_c, hi_c)
        draws = [crossovers(x, y, lo_c, hi_c) for x, y in zip(fa.boots, fb.boots)]
        if not found:
            n_cross = sum(bool(d) for d in draws)
            add(f"- {arch} vs {base}: the fitted laws do not cross between {lo_c:.2g} and"
                f" {hi_c:.2g} FLOPs ({n_cross} of {len(draws)} bootstrap draws do).")
            continue
        for cx, direction in found:
            # In each draw, the crossing of the same direction nearest to this one (in log C).
            near = [min((c for c, d in dr if d == direction),
                        key=lambda c, cx=cx: abs(math.log(c / cx)), default=None)
                    for dr in draws]
            near = [c for c in near if c is not None]
            where = ("inside" if max(fa.compute_range[0], fb.compute_range[0]) <= cx
                     <= min(fa.compute_range[1], fb.compute_range[1]) else "outside")
            ci = ""
            if len(near) >= 2:
                tail = 100 * (1 - level) / 2
                q = np.percentile(np.log10(near), [tail, 100 - tail])
                ci = f"; {level:.0%} of those lie in [{10**q[0]:.2g}, {10**q[1]:.2g}]"
            better = "below" if direction < 0 else "above"
            add(f"- {arch} vs {base}: crossover at C = {cx:.3g} FLOPs ({where} the measured"
                f" range): {arch}'s loss goes from {'above' if direction < 0 else 'below'} to"
                f" {better} {base}'s as compute grows ({len(near)} of {len(draws)} bootstrap"
                f" draws cross the same way{ci}).")
    add("")
    if spans:
        lo = min(s[0] for s in spans + [fb.compute_range])
        hi = max(s[1] for s in spans + [fb.compute_range]) * 100
        # A gap needs both laws: past the smallest "largest run", one side is extrapolated.
        measured_hi = min(s[1] for s in spans + [fb.compute_range])
        if plot_gaps(fits, base, lo, hi, out_dir / "iso_flop_gap.png", level,
                     measured_hi=measured_hi) is not None:
            add(f"![iso-FLOP gap to {base}](iso_flop_gap.png)")
            add("")
