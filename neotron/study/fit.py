"""Scaling-law fits with bootstrap uncertainty, in plain numpy.

The law is L(C) = a * C^(-b) + c: validation loss against training compute C (FLOPs), with an
irreducible term c >= 0 and a >= 0, b > 0 (Kaplan et al. 2020; Hoffmann et al. 2022, whose
"approach 3" fits the same shape in two variables).

Fitting is variable projection (Golub & Pereyra 1973): for a fixed exponent b the model is
linear in (a, c), so (a, c) come from a 2x2 least-squares solve (with the constraints a, c >= 0
applied by falling back to the boundary), and only b is searched, first on a log grid, then by
golden-section refinement around the grid's best. The squared error is measured on the loss
itself, not on log(L - c), so every point counts in the units the report shows. C is scaled by
its geometric mean while fitting, which keeps C^(-b) near 1 for any b.

Uncertainty is a case-resampling bootstrap (Efron & Tibshirani 1993): resample the (C, L) points
with replacement, refit, and take percentiles of every derived quantity (parameters, the loss at
a given C, the gap between two architectures, the crossover compute). Resamples with fewer than
three distinct compute values cannot pin three parameters and are dropped (the count of usable
resamples is reported). With three parameters a fit needs at least four points (one degree of
freedom); fewer is reported as "not enough points to fit", never as a curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

MIN_POINTS = 4  # three parameters + one degree of freedom
_B_RANGE = (1e-3, 3.0)  # exponents outside this are not a compute scaling law


@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float
    c: float

    def __call__(self, compute: float | np.ndarray) -> float | np.ndarray:
        return self.a * np.asarray(compute, dtype=float) ** (-self.b) + self.c


@dataclass
class FitResult:
    """A fit and its bootstrap: `law` is None (with `reason`) when there were too few points."""

    n_points: int
    law: PowerLaw | None
    boots: list[PowerLaw] = field(default_factory=list)
    n_resamples: int = 0  # requested; len(boots) were usable
    reason: str = ""
    compute_range: tuple[float, float] = (math.nan, math.nan)

    def interval(self, fn, level: float = 0.95) -> tuple[float, float]:
        """Percentile interval of fn(law) over the bootstrap laws (nan-valued ones dropped)."""
        vals = np.array([fn(law) for law in self.boots], dtype=float)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            return (math.nan, math.nan)
        tail = 100 * (1 - level) / 2
        lo, hi = np.percentile(vals, [tail, 100 - tail])
        return float(lo), float(hi)


def _solve_linear(f: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row f[k] of a basis [K, n]: min over A >= 0, c >= 0 of |A f[k] + c - y|^2.
    Returns (A, c, sse), each [K]. The unconstrained optimum is used when it is feasible;
    otherwise the better of the two boundaries, c = 0 (a pure power law) and A = 0 (flat)."""
    fm, ym = f.mean(axis=1, keepdims=True), y.mean()
    fc = f - fm
    var = (fc**2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        A_free = np.where(var > 0, (fc @ (y - ym)) / var, -1.0)
        A_zero_c = np.maximum(np.where((f**2).sum(axis=1) > 0, (f @ y) / (f**2).sum(axis=1), 0), 0)
    c_free = ym - A_free * fm[:, 0]
    cands = [
        (A_free, c_free, (A_free >= 0) & (c_free >= 0)),
        (A_zero_c, np.zeros_like(A_free), np.ones_like(var, dtype=bool)),
        (np.zeros_like(A_free), np.full_like(A_free, max(ym, 0.0)), np.ones_like(var, dtype=bool)),
    ]
    best_A, best_c = np.zeros_like(A_free), np.zeros_like(A_free)
    best_sse = np.full_like(A_free, np.inf)
    for A, c, ok in cands:
        sse = ((A[:, None] * f + c[:, None] - y) ** 2).sum(axis=1)
        take = ok & (sse < best_sse)
        best_A, best_c, best_sse = (np.where(take, A, best_A), np.where(take, c, best_c),
                                    np.where(take, sse, best_sse))
    return best_A, best_c, best_sse


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> PowerLaw:
    """Least-squares fit of L = a C^-b + c (a, c >= 0; b in [1e-3, 3]) to the points."""
    C = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    if C.size != y.size or C.size < 3 or np.any(C <= 0) or not np.all(np.isfinite(y)):
        raise ValueError("fit_power_law: needs >= 3 points with positive compute and finite loss")
    log_c0 = float(np.log(C).mean())
    x = np.log(C) - log_c0  # C / C0 in log space

    def best_on(log_b: np.ndarray) -> tuple[int, np.ndarray]:
        sse = _solve_linear(np.exp(-np.exp(log_b)[:, None] * x), y)[2]
        return int(np.argmin(sse)), sse

    # A log grid over the exponent, then three zooms into the bracket around the best
    # (each shrinks it 20x: the exponent ends within ~1e-5 relative of the optimum).
    log_b = np.linspace(math.log(_B_RANGE[0]), math.log(_B_RANGE[1]), 241)
    for _ in range(4):
        i, _sse = best_on(log_b)
        lo, hi = log_b[max(i - 1, 0)], log_b[min(i + 1, log_b.size - 1)]
        best = log_b[i]
        log_b = np.linspace(lo, hi, 41)
    b = math.exp(best)
    A, c, _ = _solve_linear(np.exp(-b * x)[None, :], y)
    return PowerLaw(a=float(A[0]) * math.exp(b * log_c0), b=b, c=float(c[0]))


def fit_with_bootstrap(compute: Sequence[float], loss: Sequence[float], *,
                       n_resamples: int = 1000, seed: int = 0) -> FitResult:
    """The fit on all points plus `n_resamples` case-resampled refits (seeded)."""
    C = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    n = int(C.size)
    rng_c = (float(C.min()), float(C.max())) if n else (math.nan, math.nan)
    distinct = np.unique(C).size
    if n < MIN_POINTS or distinct < 3:
        why = (f"not enough points to fit: {n} finished run{'s' if n != 1 else ''}"
               f" ({distinct} distinct compute values); L = a*C^-b + c has 3 parameters and"
               f" needs at least {MIN_POINTS} points")
        return FitResult(n_points=n, law=None, reason=why, compute_range=rng_c)
    law = fit_power_law(C, y)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        if np.unique(C[idx]).size < 3:
            continue
        boots.append(fit_power_law(C[idx], y[idx]))
    return FitResult(n_points=n, law=law, boots=boots, n_resamples=n_resamples,
                     compute_range=rng_c)


def relative_gap(a: PowerLaw, base: PowerLaw, compute: float) -> float:
    """(L_a(C) - L_base(C)) / L_base(C), in percent: negative = `a` has the lower loss."""
    return 100.0 * (float(a(compute)) / float(base(compute)) - 1.0)


def crossovers(a: PowerLaw, base: PowerLaw, lo: float, hi: float) -> list[tuple[float, int]]:
    """Every compute in [lo, hi] where the two laws cross (two power laws with floors can cross
    twice), as (C, direction): direction -1 when `a` goes from above `base` to below it as C
    grows, +1 the other way. Sign changes on a log grid, refined by bisection on log C."""
    grid = np.geomspace(lo, hi, 400)
    sign = np.sign(a(grid) - base(grid))
    out = []
    for k in np.nonzero(sign[:-1] * sign[1:] < 0)[0]:
        u, v = math.log(grid[k]), math.log(grid[k + 1])
        du = float(a(math.exp(u)) - base(math.exp(u)))
        for _ in range(80):
            m = (u + v) / 2
            dm = float(a(math.exp(m)) - base(math.exp(m)))
            if (dm < 0) == (du < 0):
                u, du = m, dm
            else:
                v = m
        out.append((math.exp((u + v) / 2), -1 if sign[k] > 0 else 1))
    return out


def crossover(a: PowerLaw, base: PowerLaw, lo: float, hi: float) -> float | None:
    """The smallest compute in [lo, hi] where the two laws cross; None if they do not."""
    found = crossovers(a, base, lo, hi)
    return found[0][0] if found else None


def paired(fa: FitResult, fb: FitResult, fn, level: float = 0.95) -> tuple[float, float, int]:
    """Percentile interval of fn(law_a, law_b) over paired bootstrap draws (the two
    architectures are resampled independently; draw i of one is paired with draw i of the
    other). Returns (lo, hi, number of draws where fn was finite)."""
    vals = np.array([fn(x, y) for x, y in zip(fa.boots, fb.boots)], dtype=float)
    finite = vals[np.isfinite(vals)]
    if finite.size == 0:
        return math.nan, math.nan, 0
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi), int(finite.size)
