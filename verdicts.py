"""The statistics that turn paired per-seed differences into verdicts on the paper's claims.

A claim compares a with b over seeds through the paired differences a - b. A directional claim ("a beats b")
holds when its 95% t-interval lies above 0. An equivalence claim ("a is no better than b", "a gives no gain")
holds when its 90% t-interval lies inside (-margin, +margin), the two one-sided tests (TOST) at 5%; it is
"better" or "worse" when its 95% interval excludes 0. Holm's step-down correction runs over every null
hypothesis a verdict would reject, and each claim shows its verdict before and after it. Pure functions of
numbers (numpy and scipy.stats); formatting is separate from computing, at the end of the file.
"""
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import integrate, optimize, special, stats

ALPHA = 0.05  # every test is two-sided at 5%: 95% intervals, and 90% intervals for the equivalence tests
POWER = 0.8  # the power at which the detectable difference and the provable margin are quoted
MARGIN = 2.0  # points of top-1: an equivalence claim's margin, fixed here before any run is judged

NOT_SHOWN = 'not shown'


# ============ one claim's statistics ============

@dataclass(frozen=True)
class Paired:
    """The paired t statistics of one claim's differences a - b.

    Everything that needs a spread (sd onwards) is None when there is no interval, and `note` says why
    (one seed, or every difference equal); it is '' otherwise.
    """
    differences: Tuple[float, ...]
    n: int
    mean: float
    sd: Optional[float]  # ddof=1
    se: Optional[float]
    ci95: Optional[Tuple[float, float]]  # t-interval with n - 1 degrees of freedom
    ci90: Optional[Tuple[float, float]]
    p: Optional[float]  # two-sided, H0: mean difference = 0
    mdd: Optional[float]  # the smallest true difference detected with POWER at this sd and n
    note: str

    def to_dict(self) -> Dict[str, Any]:
        """Plain floats, ints, strings, lists and None, for results.json."""
        return {'differences': list(self.differences), 'n': self.n, 'mean': self.mean, 'sd': self.sd,
                'se': self.se, 'ci95': _pair(self.ci95), 'ci90': _pair(self.ci90), 'p': self.p, 'mdd': self.mdd,
                'note': self.note}


def _pair(interval: Optional[Tuple[float, float]]) -> Optional[List[float]]:
    return None if interval is None else list(interval)


def paired(differences: Sequence[float]) -> Paired:
    """Mean, sd (ddof=1), standard error, 95% and 90% t-intervals (n - 1 degrees of freedom), the two-sided
    p-value of a zero mean difference, and what this sd and n could detect.

    With one difference, or all of them equal, there is no spread to build an interval from: the result says
    so in `note` and leaves the spread-dependent fields None (its verdict is then 'not shown').
    """
    d = np.asarray(differences, dtype=float)
    if d.ndim != 1 or len(d) == 0 or not np.isfinite(d).all():
        raise ValueError(f'paired differences must be a non-empty list of finite numbers, got {differences!r}')
    n, mean = len(d), float(d.mean())
    values = tuple(float(x) for x in d)
    if n < 2:
        return Paired(values, n, mean, None, None, None, None, None, None, 'one seed, no interval')
    if np.ptp(d) == 0:  # on the values: the mean of equal floats can round off them and leave an sd of 1e-16
        return Paired(values, n, mean, None, None, None, None, None, None,
                      f'no spread, all {n} differences equal {values[0]:g}; no interval')
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    df = n - 1
    t95, t90 = stats.t.ppf(1 - ALPHA / 2, df), stats.t.ppf(1 - ALPHA, df)
    p = float(2 * stats.t.sf(abs(mean) / se, df))
    return Paired(values, n, mean, sd, se, (float(mean - t95 * se), float(mean + t95 * se)),
                  (float(mean - t90 * se), float(mean + t90 * se)),
                  p, detectable(sd, n), '')


def tost_p(stat: Paired, margin: float) -> Optional[float]:
    """The TOST p-value of H0: |mean difference| >= margin (None without an interval).

    The larger of the one-sided p-values of H0: mean <= -margin and H0: mean >= +margin, each from the t
    distribution with n - 1 degrees of freedom; it is below ALPHA exactly when the 90% interval lies inside
    (-margin, +margin).
    """
    if margin <= 0:
        raise ValueError(f'an equivalence margin must be positive, got {margin}')
    if stat.se is None:
        return None
    df = stat.n - 1
    above_lower = stats.t.sf((stat.mean + margin) / stat.se, df)
    below_upper = stats.t.cdf((stat.mean - margin) / stat.se, df)
    return float(max(above_lower, below_upper))


# ============ power ============

def t_power(delta: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """The power of the two-sided paired t-test at level alpha to detect a true mean difference delta, with n
    pairs whose differences have standard deviation sd: P(|T| > t_crit) for T noncentral t with n - 1 degrees
    of freedom and noncentrality delta * sqrt(n) / sd."""
    df, nc = n - 1, delta * math.sqrt(n) / sd
    t_crit = stats.t.ppf(1 - alpha / 2, df)
    # The lower tail as the upper tail at -nc: scipy's nct.cdf returns NaN far in the lower tail at large nc.
    return float(stats.nct.sf(t_crit, df, nc) + stats.nct.sf(t_crit, df, -nc))


def _solve_up(f: Callable[[float], float], target: float) -> float:
    """The x > 0 where the increasing function f reaches target, f(0) < target: bracket by doubling, then Brent."""
    hi = 1.0
    while f(hi) < target:
        hi *= 2
    return optimize.brentq(lambda x: f(x) - target, 0.0, hi, xtol=1e-12)


def detectable(sd: float, n: int, power: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest true mean difference the two-sided paired t-test at alpha detects with power (the exact
    noncentral t power, not the normal approximation)."""
    _check_planning(sd, n, power, alpha)
    return sd * _detectable_per_sd(n, power, alpha)


# The t-test's power depends on delta / sd only, and TOST's on margin / sd: solve once per n at sd = 1, then scale.
@functools.cache
def _detectable_per_sd(n: int, power: float, alpha: float) -> float:
    return _solve_up(lambda delta: t_power(delta, 1.0, n, alpha), power)


@functools.cache
def _margin_per_sd(n: int, power: float, alpha: float) -> float:
    return _solve_up(lambda margin: tost_power(margin, 1.0, n, alpha), power)


def tost_power(margin: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """The power of TOST at alpha (the 1 - 2 alpha interval inside +-margin) when the true mean difference is 0.

    Given the sample sd s, TOST rejects when |mean| < margin - t * s / sqrt(n), with mean ~ N(0, sd^2 / n)
    independent of s^2 ~ sd^2 chi2(df) / df; the power integrates that normal probability over the chi2 density.
    Written by hand: scipy has no TOST power, and statsmodels (which does) is not a dependency of this project.
    """
    df = n - 1
    t_crit = stats.t.ppf(1 - alpha, df)
    e = margin * math.sqrt(n) / sd  # the margin in standard errors of a known sd

    log_norm = (df / 2) * math.log(2) + math.lgamma(df / 2)

    def rejects(u: float) -> float:  # u = df * s^2 / sd^2; special functions, not scipy.stats, for speed
        chi2_pdf = math.exp((df / 2 - 1) * math.log(u) - u / 2 - log_norm)
        return (2 * special.ndtr(e - t_crit * math.sqrt(u / df)) - 1) * chi2_pdf

    # Integrate where the chi2 mass is (outside, 2e-12 of it in all), and below u_max, beyond which the interval
    # is wider than the margin whatever the mean: at large df the mass is a narrow peak that quad could step over.
    lo, hi = stats.chi2.ppf(1e-12, df), min(stats.chi2.isf(1e-12, df), df * (e / t_crit) ** 2)
    return float(integrate.quad(rejects, lo, hi, limit=200)[0]) if hi > lo else 0.0


def provable_margin(sd: float, n: int, power: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest margin TOST at alpha establishes with power when the true mean difference is 0."""
    _check_planning(sd, n, power, alpha)
    return sd * _margin_per_sd(n, power, alpha)


def seeds_needed(sd: float, delta: float = MARGIN, power: float = POWER, alpha: float = ALPHA) -> int:
    """The smallest number of seeds (pairs) at which the two-sided paired t-test at alpha detects a true mean
    difference delta with power, when the differences have standard deviation sd (for planning)."""
    if delta <= 0:
        raise ValueError(f'the difference to detect must be positive, got {delta}')
    _check_planning(sd, 2, power, alpha)
    lo, hi = 1, 2  # t_power(.., lo) < power <= t_power(.., hi), once hi is found by doubling; n = 1 has no test
    while t_power(delta, sd, hi, alpha) < power:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if t_power(delta, sd, mid, alpha) < power else (lo, mid)
    return hi


def _check_planning(sd: float, n: int, power: float, alpha: float) -> None:
    if not sd > 0:
        raise ValueError(f'the standard deviation of the differences must be positive, got {sd}')
    if n < 2:
        raise ValueError(f'a paired t-test needs at least 2 pairs, got {n}')
    if not 0 < alpha < power < 1:
        raise ValueError(f'need 0 < alpha < power < 1, got alpha {alpha} and power {power}')


# ============ verdicts ============

def verdict(mean: float, p: Optional[float], p_equivalence: Optional[float], equivalence: bool) -> str:
    """The rule that turns one claim's numbers into words: a verdict other than 'not shown' rejects a null.

    Directional claims (a - b > 0 expected): 'holds' or 'reversed' when p < ALPHA (the 95% interval excludes
    0), by the sign of the mean. Equivalence claims: 'holds' when p_equivalence < ALPHA (the 90% interval lies
    inside the margin); else 'better' or 'worse' when p < ALPHA. Otherwise, or without a p-value, 'not shown'.
    The same rule reads the uncorrected and the Holm-adjusted p-values.
    """
    if p is None:
        return NOT_SHOWN
    if equivalence and p_equivalence is not None and p_equivalence < ALPHA:
        return 'holds'
    if p < ALPHA:
        if equivalence:
            return 'better' if mean > 0 else 'worse'
        return 'holds' if mean > 0 else 'reversed'
    return NOT_SHOWN


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm's step-down adjusted p-values, in the order given.

    In ascending order p_(1) <= ... <= p_(m), adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)).
    A few lines by hand, rather than statsmodels' multipletests, to keep the dependencies as they are.
    """
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Judgement:
    """One claim judged: its statistics, margin (None for a directional claim), p-values and verdicts, before
    and after Holm's correction over the family it was judged in."""
    stat: Paired
    margin: Optional[float]
    p_equivalence: Optional[float]
    provable_margin: Optional[float]  # the smallest margin TOST would establish with POWER if the truth were 0
    verdict: str
    p_holm: Optional[float]
    p_equivalence_holm: Optional[float]
    verdict_holm: str

    def to_dict(self) -> Dict[str, Any]:
        """Plain floats, ints, strings, lists and None, for results.json."""
        return {**self.stat.to_dict(), 'margin': self.margin, 'p_equivalence': self.p_equivalence,
                'provable_margin': self.provable_margin,
                'verdict': self.verdict, 'p_holm': self.p_holm, 'p_equivalence_holm': self.p_equivalence_holm,
                'verdict_holm': self.verdict_holm}


def judge(family: Sequence[Tuple[Sequence[float], Optional[float]]]) -> List[Judgement]:
    """Judge a family of claims, each (paired differences a - b, margin): margin None for a directional claim,
    a positive number (MARGIN in points, say) for an equivalence claim.

    Holm's correction runs over every null a verdict would reject: H0 mean = 0 of every claim, and H0
    |mean| >= margin of every equivalence claim. A claim without an interval (one seed, no spread) has no
    p-value, adds no null, and is 'not shown' either way.
    """
    stat = [paired(d) for d, _ in family]
    margins = [margin for _, margin in family]
    p_eq = [None if margin is None else tost_p(s, margin) for s, margin in zip(stat, margins)]
    nulls = [(i, 'p', s.p) for i, s in enumerate(stat) if s.p is not None]
    nulls += [(i, 'eq', p) for i, p in enumerate(p_eq) if p is not None]
    adjusted = {(i, kind): q for (i, kind, _), q in zip(nulls, holm([p for _, _, p in nulls]))}
    result = []
    for i, (s, margin) in enumerate(zip(stat, margins)):
        p_holm, p_eq_holm = adjusted.get((i, 'p')), adjusted.get((i, 'eq'))
        equivalence = margin is not None
        provable = provable_margin(s.sd, s.n) if equivalence and s.sd is not None else None
        result.append(Judgement(s, margin, p_eq[i], provable, verdict(s.mean, s.p, p_eq[i], equivalence), p_holm,
                                p_eq_holm, verdict(s.mean, p_holm, p_eq_holm, equivalence)))
    return result


# ============ words ============

def _p(p: float) -> str:
    return 'p < 0.001' if p < 0.001 else f'p = {p:.3f}'


def line(j: Judgement, label: str, unit: str = 'points', digits: int = 1) -> str:
    """One claim as a sentence, e.g. 'hard - none = +2.1 points, 95% CI [-0.4, 4.6], n = 10, p = 0.090 (not
    shown; after Holm: not shown; detectable at 80% power: 2.8)'; an equivalence claim adds its margin, 90%
    interval, TOST p-value and the smallest margin it could establish.

    Args:
        j: the judged claim.
        label: what is subtracted, 'a - b'.
        unit: the unit of the difference ('' for none).
        digits: decimals of the difference, its intervals and the powered figures.
    """
    s, f = j.stat, f'.{digits}f'
    unit = f' {unit}' if unit else ''
    head = f'{label} = {s.mean:+{f}}{unit}'
    if s.se is None:
        return f'{head}, n = {s.n} ({j.verdict}: {s.note})'
    words = [head, f'95% CI [{s.ci95[0]:{f}}, {s.ci95[1]:{f}}]']
    if j.margin is not None:
        words.append(f'90% CI [{s.ci90[0]:{f}}, {s.ci90[1]:{f}}] against the margin ±{j.margin:{f}}')
    words += [f'n = {s.n}', _p(s.p)]
    if j.margin is not None:
        words.append(f'equivalence {_p(j.p_equivalence)}')
    powered = [f'detectable at {POWER:.0%} power: {s.mdd:{f}}']
    if j.margin is not None:
        powered.append(f'provable margin at {POWER:.0%} power: {j.provable_margin:{f}}')
    return f'{", ".join(words)} ({j.verdict}; after Holm: {j.verdict_holm}; {"; ".join(powered)})'
