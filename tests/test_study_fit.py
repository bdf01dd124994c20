"""The scaling-law fit (neotron/study/fit.py) against independent references: known generating
parameters (noise-free and noisy, seeded), a brute-force least-squares search written here
from scratch, and closed-form gaps and crossovers of two known laws; plus the report built from
synthetic results (tables, sentences, PNGs)."""

import math
import re

import numpy as np
import pytest

from neotron.study.fit import (
    PowerLaw,
    crossover,
    crossovers,
    fit_power_law,
    fit_with_bootstrap,
    paired,
    relative_gap,
)

TRUE = dict(a=120.0, b=0.15, c=1.7)
COMPUTE = np.geomspace(1e13, 1e17, 8)


def law(C, a, b, c):  # the generating law, written out again (no helper shared with fit.py)
    return a * np.power(C, -b) + c


def test_noise_free_points_give_back_the_parameters():
    fit = fit_power_law(COMPUTE, law(COMPUTE, **TRUE))
    assert fit.a == pytest.approx(TRUE["a"], rel=1e-3)
    assert fit.b == pytest.approx(TRUE["b"], rel=1e-4)
    assert fit.c == pytest.approx(TRUE["c"], rel=1e-4)


def _brute_force_sse(C, y):
    """Global least squares by exhaustion: a fine grid over (b, c), with a's optimum in closed
    form for each pair (a >= 0), then a finer grid around the best cell."""
    best = (math.inf, None)
    b_grid, c_grid = np.linspace(0.01, 1.0, 400), np.linspace(0.0, y.min(), 400)
    for _ in range(3):
        X = C[None, :] ** -b_grid[:, None]  # [nb, n]
        for c in c_grid:
            r = y - c
            a = np.clip((X @ r) / (X * X).sum(1), 0, None)
            sse = ((a[:, None] * X - r) ** 2).sum(1)
            i = int(np.argmin(sse))
            if sse[i] < best[0]:
                best = (float(sse[i]), (b_grid[i], c))
        b0, c0 = best[1]
        db, dc = b_grid[1] - b_grid[0], c_grid[1] - c_grid[0]
        b_grid = np.linspace(max(b0 - db, 1e-3), b0 + db, 200)
        c_grid = np.linspace(max(c0 - dc, 0.0), c0 + dc, 200)
    return best[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_fit_is_the_least_squares_optimum(seed):
    rng = np.random.default_rng(seed)
    y = law(COMPUTE, **TRUE) + rng.normal(0, 0.02, COMPUTE.size)
    fit = fit_power_law(COMPUTE, y)
    ours = float(((law(COMPUTE, fit.a, fit.b, fit.c) - y) ** 2).sum())
    ref = _brute_force_sse(COMPUTE, y)
    assert ours <= ref * (1 + 1e-3) + 1e-12, (ours, ref)


def test_constraints_hold_when_the_data_want_a_negative_floor():
    """Points from a law with c < 0 (no loss has that): the fit stays at c = 0, a > 0, and is
    still the best feasible one (brute-force search over c >= 0)."""
    y = law(COMPUTE, a=3.0, b=0.02, c=-0.5)
    fit = fit_power_law(COMPUTE, y)
    assert fit.c == 0.0 and fit.a > 0
    ours = float(((law(COMPUTE, fit.a, fit.b, fit.c) - y) ** 2).sum())
    assert ours <= _brute_force_sse(COMPUTE, y) * (1 + 1e-3) + 1e-12


def test_bootstrap_intervals_cover_the_true_parameters():
    rng = np.random.default_rng(7)
    y = law(COMPUTE, **TRUE) * np.exp(rng.normal(0, 0.005, COMPUTE.size))
    res = fit_with_bootstrap(COMPUTE, y, n_resamples=400, seed=0)
    assert res.law is not None and len(res.boots) > 350
    for key in ("a", "b", "c"):
        lo, hi = res.interval(lambda law_, k=key: getattr(law_, k))
        assert lo <= TRUE[key] <= hi, (key, lo, hi)
    lo, hi = res.interval(lambda law_: law_.b)
    assert hi - lo < 0.2  # an interval, not "anything goes"
    # the loss predicted inside the measured range is pinned down much better
    lo, hi = res.interval(lambda law_: float(law_(1e15)))
    assert hi - lo < 0.05


def test_intervals_cover_at_about_the_nominal_rate():
    """Over independent noisy datasets the 95% interval of the loss at mid-range compute
    should contain the truth most of the time (percentile bootstrap with 8 points tends to
    run a little short of 95%; far below would mean a broken bootstrap)."""
    c_mid, hits, trials = 1e15, 0, 12
    for seed in range(trials):
        rng = np.random.default_rng(100 + seed)
        y = law(COMPUTE, **TRUE) + rng.normal(0, 0.01, COMPUTE.size)
        res = fit_with_bootstrap(COMPUTE, y, n_resamples=150, seed=seed)
        lo, hi = res.interval(lambda law_: float(law_(c_mid)))
        hits += lo <= law(c_mid, **TRUE) <= hi
    assert hits >= 9, hits


def test_too_few_points_is_said_not_fitted():
    for n in (0, 1, 3):
        res = fit_with_bootstrap(COMPUTE[:n], law(COMPUTE[:n], **TRUE), n_resamples=10)
        assert res.law is None and "not enough points to fit" in res.reason
    same_c = fit_with_bootstrap([1e15] * 3 + [1e16] * 3, [2.0, 2.1, 1.9, 1.8, 1.7, 1.9])
    assert same_c.law is None and "2 distinct" in same_c.reason


def test_gap_and_crossover_of_two_known_laws():
    base = PowerLaw(a=50.0, b=0.1, c=1.5)
    c_star = 3e16
    # choose the other law's a so that both give the same loss at c_star
    b2, c2 = 0.16, 1.2
    a2 = (50.0 * c_star**-0.1 + 1.5 - c2) * c_star**b2
    other = PowerLaw(a=a2, b=b2, c=c2)
    got = crossover(other, base, 1e12, 1e20)
    assert got == pytest.approx(c_star, rel=1e-6)
    for C in (1e14, 1e18):
        ref = 100 * ((a2 * C**-b2 + c2) / (50.0 * C**-0.1 + 1.5) - 1)
        assert relative_gap(other, base, C) == pytest.approx(ref, rel=1e-9)
    assert relative_gap(other, base, 1e14) > 0 > relative_gap(other, base, 1e18)
    assert crossover(other, base, 1e12, 1e15) is None  # not inside that window
    # direction -1: `other` goes from above the baseline to below it as compute grows
    assert [(pytest.approx(c, rel=1e-6), d) for c, d in crossovers(other, base, 1e12, 1e20)] \
        == [(c_star, -1)]
    # two floors and two exponents can cross twice: both crossings are found, in order
    twice = PowerLaw(a=100.0, b=0.5, c=2.0)  # above at small C, below in the middle, above
    line = PowerLaw(a=10.0, b=0.1, c=1.0)    # again once the floors dominate
    ref_grid = np.geomspace(1e1, 1e20, 400001)
    diff = law(ref_grid, 100.0, 0.5, 2.0) - law(ref_grid, 10.0, 0.1, 1.0)
    ref = ref_grid[np.nonzero(np.diff(np.sign(diff)))[0]]
    got = crossovers(twice, line, 1e1, 1e20)
    assert len(ref) == 2 and [d for _, d in got] == [-1, 1]
    for (c, _), r in zip(got, ref):
        assert c == pytest.approx(r, rel=1e-3)


def test_paired_interval_of_the_gap_covers_the_truth():
    base_true, other_true = dict(a=60.0, b=0.12, c=1.6), dict(a=90.0, b=0.15, c=1.55)
    rng = np.random.default_rng(3)
    fb = fit_with_bootstrap(COMPUTE, law(COMPUTE, **base_true) + rng.normal(0, 0.005, 8),
                            n_resamples=300, seed=1)
    fa = fit_with_bootstrap(COMPUTE, law(COMPUTE, **other_true) + rng.normal(0, 0.005, 8),
                            n_resamples=300, seed=2)
    C = 1e15
    truth = 100 * (law(C, **other_true) / law(C, **base_true) - 1)
    lo, hi, n = paired(fa, fb, lambda x, y: relative_gap(x, y, C))
    assert n > 250 and lo <= truth <= hi


def test_report_from_synthetic_results(tmp_path):
    """write_report on results with enough points: the fit table has intervals, the iso-FLOP
    table and crossover sentence name the baseline, and the PNGs are written."""
    from neotron.study.report import write_report
    from neotron.study.spec import Study, StudySpec

    spec = StudySpec.model_validate({
        "study_dir": str(tmp_path), "budget": {"tokens": 1000}, "fit": {"resamples": 100},
        "architectures": [{"name": n, "config": "x.yaml", "sizes": [{"name": "s"}]}
                          for n in ("llama", "newarch")],
    })
    rng = np.random.default_rng(0)
    laws = {"llama": TRUE, "newarch": dict(a=400.0, b=0.19, c=1.6)}
    rows = []
    for arch, p in laws.items():
        for i, C in enumerate(COMPUTE[:6]):
            rows.append({"run": f"{arch}-s{i}", "arch": arch, "size": f"s{i}", "lr": 1e-3,
                         "lr_multiplier": 1.0, "status": "done", "steps": 10, "tokens": 1000,
                         "flops": float(C), "flops_per_token": float(C) / 1000,
                         "params_total": 10, "params_active": 10, "params_non_embedding": 5,
                         "params_embedding": 5,
                         "val_loss": float(law(C, **p) + rng.normal(0, 0.003)),
                         "wall_time_s": 1.0, "fitted": True, "run_dir": str(tmp_path / "none")})
    path = write_report(Study(spec=spec, path=tmp_path / "s.yaml", runs=[]), rows)
    text = path.read_text()
    assert "| llama | 6 |" in text and "| newarch | 6 |" in text and " of 100 |" in text
    assert "Iso-FLOP comparison with llama" in text
    # the quotable sentence: at the top of the measured range the truth is 9.70% below
    m = re.search(r"At ([0-9.e+]+) FLOPs, newarch's loss is ([0-9.]+)% (below|above) llama's",
                  text)
    assert m, text
    C = float(m.group(1))
    truth = 100 * (law(C, **laws["newarch"]) / law(C, **laws["llama"]) - 1)
    signed = float(m.group(2)) * (-1 if m.group(3) == "below" else 1)
    assert C == pytest.approx(COMPUTE[5], rel=1e-2) and signed == pytest.approx(truth, abs=1.0)
    # newarch starts worse and, with the steeper exponent, crosses llama inside the window
    assert "crossover at C =" in text
    for png in ("loss_vs_flops.png", "iso_flop_gap.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
