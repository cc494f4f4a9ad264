"""verdicts.py against hand-computed cases: t-intervals with n - 1 degrees of freedom, the verdict rule at its
thresholds, TOST, Holm's adjusted p-values, and the power figures (the noncentral t, tables and simulation)."""
import json
import math
from typing import Optional

import numpy as np
import pytest
from scipy import stats

from verdicts import (
    MARGIN,
    NOT_SHOWN,
    Paired,
    holm,
    judge,
    line,
    paired,
    provable_margin,
    seeds_needed,
    t_power,
    tost_p,
    tost_power,
    verdict,
)

# A sample worked by hand: mean 2, squared deviations 1 + 0 + 4 + 2.25 + 0.25 = 7.5, so sd^2 = 7.5 / 4 (ddof=1)
# and se^2 = sd^2 / 5 = 0.375.
SAMPLE = [1.0, 2.0, 4.0, 0.5, 2.5]
SAMPLE_SE = math.sqrt(0.375)
CENTRED = [x - 2.0 for x in SAMPLE]  # mean 0, same sd
T95_4, T90_4 = stats.t.ppf(0.975, 4), stats.t.ppf(0.95, 4)


def shifted(mean: float, se: float) -> list:
    """SAMPLE's shape, rescaled to standard error se and moved to the given mean."""
    return [mean + x * se / SAMPLE_SE for x in CENTRED]


def interval_words(s: Paired, margin: Optional[float] = None) -> str:
    """The verdict read off the intervals, as the rule states it (the test's own reading, not the module's)."""
    lo95, hi95 = s.ci95
    if margin is not None:
        if -margin < s.ci90[0] and s.ci90[1] < margin:
            return 'holds'
        return 'better' if lo95 > 0 else 'worse' if hi95 < 0 else NOT_SHOWN
    return 'holds' if lo95 > 0 else 'reversed' if hi95 < 0 else NOT_SHOWN


# ============ intervals and p-values ============

def test_t_quantiles_use_n_minus_1_degrees_of_freedom():
    """Five seeds: 95% and 90% half-widths are 2.776 and 2.132 standard errors (t table, 4 df); ten: 2.262, 1.833."""
    s = paired(SAMPLE)
    assert (s.ci95[1] - s.mean) / SAMPLE_SE == pytest.approx(2.776, abs=5e-4)
    assert (s.ci90[1] - s.mean) / SAMPLE_SE == pytest.approx(2.132, abs=5e-4)
    ten = paired(SAMPLE + [x + 1.0 for x in SAMPLE])
    assert (ten.ci95[1] - ten.mean) / ten.se == pytest.approx(2.262, abs=5e-4)
    assert (ten.ci90[1] - ten.mean) / ten.se == pytest.approx(1.833, abs=5e-4)


def test_interval_is_mean_plus_minus_t_sd_over_sqrt_n_with_ddof_1():
    s = paired(SAMPLE)
    assert (s.n, s.mean) == (5, 2.0)
    assert s.sd == pytest.approx(math.sqrt(7.5 / 4), rel=1e-12)
    assert s.se == pytest.approx(SAMPLE_SE, rel=1e-12)
    assert s.ci95 == pytest.approx((2.0 - T95_4 * SAMPLE_SE, 2.0 + T95_4 * SAMPLE_SE), rel=1e-12)
    assert s.ci90 == pytest.approx((2.0 - T90_4 * SAMPLE_SE, 2.0 + T90_4 * SAMPLE_SE), rel=1e-12)
    assert s.p == pytest.approx(2 * stats.t.sf(2.0 / SAMPLE_SE, 4), rel=1e-12)
    assert 0.02 < s.p < 0.05  # t = 3.27 lies between the table's 2.776 (p 0.05) and 3.747 (p 0.02)


# ============ the verdict rule at its thresholds ============

@pytest.mark.parametrize('mean, expected', [
    (T95_4 * SAMPLE_SE + 1e-6, 'holds'),  # the 95% interval's lower bound at +1e-6
    (T95_4 * SAMPLE_SE - 1e-6, NOT_SHOWN),  # ... at -1e-6
    (-T95_4 * SAMPLE_SE - 1e-6, 'reversed'),  # the upper bound at -1e-6
    (-T95_4 * SAMPLE_SE + 1e-6, NOT_SHOWN),
], ids=['lower bound +1e-6', 'lower bound -1e-6', 'upper bound -1e-6', 'upper bound +1e-6'])
def test_directional_verdict_at_the_95_percent_bound(mean, expected):
    """Within 1e-6 of the threshold, so an interval of 2 SE or 1 SE, an sd with ddof=0 or a normal quantile
    flips at least one case."""
    d = shifted(mean, SAMPLE_SE)
    bound = paired(d).ci95[0] if mean > 0 else paired(d).ci95[1]
    assert abs(bound) == pytest.approx(1e-6, abs=1e-9)
    (j,) = judge([(d, None)])  # a family of one: Holm changes nothing
    assert (j.verdict, j.verdict_holm) == (expected, expected)
    assert j.p_holm == j.stat.p


@pytest.mark.parametrize('bound, sign, expected', [
    (MARGIN - 1e-6, 1, 'holds'), (MARGIN + 1e-6, 1, NOT_SHOWN),  # the 90% upper bound just inside / outside
    (MARGIN - 1e-6, -1, 'holds'), (MARGIN + 1e-6, -1, NOT_SHOWN),  # the lower bound at -margin
], ids=['upper bound inside', 'upper bound outside', 'lower bound inside', 'lower bound outside'])
def test_equivalence_verdict_at_the_margin(bound, sign, expected):
    """The 90% interval inside (-margin, margin) exactly when the TOST p-value is below 0.05, 1e-6 either side."""
    se = 0.5  # the 95% interval (half-width 1.39) includes 0 at the mean 2 - 1.07 = 0.93: no 'better' either
    d = shifted(sign * (bound - T90_4 * se), se)
    s = paired(d)
    assert max(abs(s.ci90[0]), abs(s.ci90[1])) == pytest.approx(bound, abs=1e-9)
    assert s.ci95[0] < 0 < s.ci95[1]
    assert (tost_p(s, MARGIN) < 0.05) == (expected == 'holds')
    assert tost_p(s, MARGIN) == pytest.approx(0.05, abs=1e-5)
    (j,) = judge([(d, MARGIN)])
    assert j.verdict == expected


def test_a_noisy_no_better_claim_is_not_shown():
    """The issue's soft vs none: -3.7 with a 90% interval [-12.0, 4.6] does not exclude a 4-point gain; nor does
    a mean of exactly 0 with an interval of +-3 confirm anything."""
    wide = shifted(-3.7, 8.3 / T90_4)
    assert paired(wide).ci90 == pytest.approx((-12.0, 4.6), abs=1e-9)
    centred = shifted(0.0, 3.0 / T90_4)
    for d in (wide, centred):
        (j,) = judge([(d, MARGIN)])
        assert (j.verdict, j.verdict_holm) == (NOT_SHOWN, NOT_SHOWN)


def test_a_significantly_worse_or_better_claim_is_worse_or_better():
    """The issue's control, 8.0 points below none with a 95% interval [-13.6, -2.4], is 'worse', not 'holds'."""
    worse, better = shifted(-8.0, 2.0), shifted(8.0, 2.0)
    assert paired(worse).ci95 == pytest.approx((-8.0 - 2 * T95_4, -8.0 + 2 * T95_4))
    assert [j.verdict for j in judge([(worse, MARGIN), (better, MARGIN)])] == ['worse', 'better']


def test_an_equivalence_inside_the_margin_holds():
    d = shifted(0.3, 0.25)  # 90% interval [-0.23, 0.83]
    (j,) = judge([(d, MARGIN)])
    assert j.verdict == 'holds' and j.p_equivalence < 0.05


def test_the_p_value_form_and_the_interval_form_agree_on_random_samples():
    """300 seeded samples of 2 to 12 differences, spread so that every verdict word occurs: the rule on p-values
    gives what the intervals say, p and the 95% interval equal scipy's one-sample t-test."""
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        n = int(rng.integers(2, 13))
        d = list(rng.normal(rng.uniform(-6, 6), rng.uniform(0.1, 6), n))
        s = paired(d)
        reference = stats.ttest_1samp(d, 0.0)
        assert s.p == pytest.approx(reference.pvalue, rel=1e-9, abs=1e-300)
        assert s.ci95 == pytest.approx(tuple(reference.confidence_interval(0.95)), rel=1e-9)
        for margin in (None, MARGIN):
            p_eq = None if margin is None else tost_p(s, margin)
            words = verdict(s.mean, s.p, p_eq, margin is not None)
            assert words == interval_words(s, margin), (d, margin)
            seen.add((margin, words))
    assert seen == {(None, 'holds'), (None, 'reversed'), (None, NOT_SHOWN),
                    (MARGIN, 'holds'), (MARGIN, 'better'), (MARGIN, 'worse'), (MARGIN, NOT_SHOWN)}


@pytest.mark.filterwarnings('error')
def test_one_seed_or_no_spread_has_no_interval_and_says_so():
    for d, note in (([1.5], 'one seed'), ([0.1, 0.1, 0.1], 'no spread')):
        (j, k) = judge([(d, None), (d, MARGIN)])
        s = j.stat
        assert note in s.note and (s.sd, s.se, s.ci95, s.ci90, s.p, s.mdd) == (None,) * 6
        assert [j.verdict, j.verdict_holm, k.verdict, k.verdict_holm] == [NOT_SHOWN] * 4
        assert line(j, 'a - b').endswith(f'(not shown: {s.note})')


def test_bad_input_is_refused_in_one_line():
    for d in ([], [1.0, float('nan')]):
        with pytest.raises(ValueError, match='non-empty list of finite numbers'):
            paired(d)
    with pytest.raises(ValueError, match='margin must be positive'):
        judge([(SAMPLE, 0.0)])
    with pytest.raises(ValueError, match='standard deviation'):
        seeds_needed(0.0)


# ============ Holm ============

@pytest.mark.parametrize('p, adjusted', [
    # sorted 0.005, 0.01, 0.03, 0.04, 0.5 -> 5 x 0.005, 4 x 0.01, 3 x 0.03, max(0.09, 2 x 0.04), 0.5
    ([0.01, 0.04, 0.03, 0.005, 0.5], [0.04, 0.09, 0.09, 0.025, 0.5]),
    # sorted 0.01, 0.015, 0.4, 0.45, 0.9 -> 0.05, 0.06, min(1, 1.2), max(1, 0.9), max(1, 0.9)
    ([0.01, 0.4, 0.45, 0.015, 0.9], [0.05, 1.0, 1.0, 0.06, 1.0]),
    # a tie: sorted 0.001, 0.02, 0.02 -> 0.003, 0.04, max(0.04, 0.02); both tied values 0.04 in either order
    ([0.02, 0.02, 0.001], [0.04, 0.04, 0.003]),
    ([], []),
], ids=['monotone max', 'cap at 1', 'tie', 'empty'])
def test_holm_adjusted_p_values_by_hand(p, adjusted):
    assert holm(p) == pytest.approx(adjusted, abs=1e-15)


def test_holm_turns_a_holds_into_not_shown_and_counts_every_null():
    """A claim at p = 0.031 holds alone. Beside a directional and an equivalence claim (one and two nulls), four
    p-values: the equivalence's TOST p (1e-5) is the smallest, times 4, and still holds; the claim's is second,
    times 3: 0.093, not shown."""
    noisy = shifted(0.0, 3.0)
    inside = shifted(0.0, 0.2)
    strong, other, equivalent = judge([(SAMPLE, None), (noisy, None), (inside, MARGIN)])
    assert equivalent.p_equivalence < strong.stat.p < min(other.stat.p, equivalent.stat.p)
    assert equivalent.p_equivalence_holm == pytest.approx(4 * equivalent.p_equivalence, rel=1e-12)
    assert (equivalent.verdict, equivalent.verdict_holm) == ('holds', 'holds')
    assert strong.p_holm == pytest.approx(3 * strong.stat.p, rel=1e-12)
    assert (strong.verdict, strong.verdict_holm) == ('holds', NOT_SHOWN)


# ============ power ============

def with_sd(n: int, sd: float) -> list:
    """n seeded differences whose sample sd (ddof=1) is exactly sd."""
    d = np.random.default_rng(n).normal(0, 1, n)
    return list((d - d.mean()) / d.std(ddof=1) * sd)


@pytest.mark.parametrize('n, sd', [(10, 1.0), (7, 2.5), (3, 0.4)])
def test_detectable_difference_has_80_percent_power(n, sd):
    """At the mdd the paired t-test's power, from scipy's noncentral t directly, is 0.80."""
    mdd = paired(with_sd(n, sd)).mdd
    t_crit, nc = stats.t.ppf(0.975, n - 1), mdd * math.sqrt(n) / sd
    assert stats.nct.sf(t_crit, n - 1, nc) + stats.nct.cdf(-t_crit, n - 1, nc) == pytest.approx(0.8, abs=1e-6)


def test_power_at_no_difference_is_the_size_of_the_test():
    """Both tails count: with no true difference the two-sided test rejects 5% of the time, whatever n and sd."""
    for n, sd in ((2, 1.0), (5, 3.0), (30, 0.1)):
        assert t_power(0.0, sd, n) == pytest.approx(0.05, abs=1e-9)  # scipy < 1.15 is off by 1e-12


def test_detectable_difference_against_the_table_and_a_simulation():
    """G*Power's table: a paired t-test needs 10 pairs for d = 1 (power 0.803), so at n = 10, sd = 1 the mdd is
    just under 1, and over 1 at n = 9. And 20,000 simulated 5-seed experiments whose true difference is the mdd
    reject H0 in 80% of them."""
    assert 0.99 < paired(with_sd(10, 1.0)).mdd < 1.0 < paired(with_sd(9, 1.0)).mdd
    mdd = paired(with_sd(5, 1.0)).mdd
    d = np.random.default_rng(0).normal(mdd, 1.0, (20000, 5))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(5))
    assert np.mean(np.abs(t) > stats.t.ppf(0.975, 4)) == pytest.approx(0.8, abs=0.01)  # 3.5 simulation SEs


def test_provable_margin_has_80_percent_power_in_a_simulation():
    """20,000 simulated 5-seed experiments with no true difference: at the provable margin, 80% of the 90%
    intervals lie inside it; the exact power at that margin is 0.80."""
    margin = provable_margin(1.0, 5)
    assert tost_power(margin, 1.0, 5) == pytest.approx(0.8, abs=1e-6)
    d = np.random.default_rng(1).normal(0.0, 1.0, (20000, 5))
    mean, half = d.mean(1), T90_4 * d.std(1, ddof=1) / math.sqrt(5)
    assert np.mean((mean - half > -margin) & (mean + half < margin)) == pytest.approx(0.8, abs=0.01)


def test_seeds_needed_against_the_table_and_monotone_in_sd():
    """G*Power's table for a two-sided paired t-test at 5%, 80% power: d = 1 needs 10 pairs, d = 0.5 needs 34."""
    assert seeds_needed(sd=1.0, delta=1.0) == 10
    assert seeds_needed(sd=2.0, delta=1.0) == 34
    assert seeds_needed(sd=4.0) == 34  # delta defaults to the 2-point margin
    needed = [seeds_needed(sd) for sd in np.linspace(0.5, 8.0, 16)]
    assert needed == sorted(needed) and needed[0] < needed[-1]


# ============ records and words ============

def test_to_dict_holds_plain_json_types():
    plain = (int, float, str, list, type(None))
    for j in judge([(SAMPLE, None), (CENTRED, MARGIN), ([1.5], None)]):
        record = j.to_dict()
        assert all(type(v) in plain for v in record.values()), record
        assert all(type(x) is float for v in record.values() if isinstance(v, list) for x in v)
        assert json.loads(json.dumps(record)) == record
        assert {'differences', 'margin', 'verdict', 'verdict_holm'} <= set(record)


def test_line_reads_as_the_style_guide_writes_a_verdict():
    """Hand-computed figures: SAMPLE's mean 2, 95% CI 2 -+ 2.776 x 0.612 = [0.3, 3.7], p = 0.031, mdd 1.68 x 1.37
    = 2.3; [0.5, 1, -0.5, 0, 0.5]: mean 0.3, se sqrt(0.325 / 5) = 0.255, 95% CI [-0.4, 1.0], 90% CI [-0.2, 0.8]."""
    directional, equivalence = judge([(SAMPLE, None)])[0], judge([([0.5, 1.0, -0.5, 0.0, 0.5], MARGIN)])[0]
    assert line(directional, 'hard - none') == (
        'hard - none = +2.0 points, 95% CI [0.3, 3.7], n = 5, p = 0.031 '
        '(holds; after Holm: holds; detectable at 80% power: 2.3)')
    assert line(equivalence, 'soft - none') == (
        'soft - none = +0.3 points, 95% CI [-0.4, 1.0], 90% CI [-0.2, 0.8] against the margin ±2.0, n = 5, '
        'p = 0.305, equivalence p = 0.001 (holds; after Holm: holds; detectable at 80% power: 1.0; '
        'provable margin at 80% power: 0.9)')
