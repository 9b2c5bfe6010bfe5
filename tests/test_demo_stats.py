"""The demo's verdict statistics (grace.demo.stats): a two-way paired bootstrap, checked against hand-derived
and exactly enumerated bootstrap distributions (float64)."""

import itertools
import math

import numpy as np
import pytest

from grace.demo.stats import BETTER, UNRESOLVED, WORSE, paired_bootstrap, verdict


def _exact(d: np.ndarray, resample_seeds: bool = True) -> np.ndarray:
    """Every equally likely replicate mean of the bootstrap, enumerated: all S^S seed draws times all Q^Q
    question draws (float64)."""
    s, q = d.shape
    seed_draws = list(itertools.product(range(s), repeat=s)) if resample_seeds else [tuple(range(s))]
    return np.array([d[np.ix_(si, qi)].mean() for si in seed_draws
                     for qi in itertools.product(range(q), repeat=q)], dtype=np.float64)


def test_two_questions_one_right_one_tied_is_unresolved():
    # D = [1, 0]: the replicate mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4 -> interval [0, 1].
    c = paired_bootstrap([[1, 0]], [[0, 0]])
    assert c["mean"] == 0.5 and c["lo"] == 0.0 and c["hi"] == 1.0
    assert c["se"] == pytest.approx(math.sqrt(0.125), rel=0.03)   # Var = 1/4 * 1/2 over 2 draws: 1/8
    assert verdict(c) == UNRESOLVED and c["paired_by"] == "question"


def test_all_right_against_all_wrong_is_resolved_both_ways():
    a, b = np.ones((3, 50)), np.zeros((3, 50))
    up, down = paired_bootstrap(a, b), paired_bootstrap(b, a)
    assert (up["mean"], up["lo"], up["hi"]) == (1.0, 1.0, 1.0) and verdict(up) == BETTER
    assert (down["mean"], down["lo"], down["hi"]) == (-1.0, -1.0, -1.0) and verdict(down) == WORSE
    same = paired_bootstrap(a, a)
    assert (same["lo"], same["hi"]) == (0.0, 0.0) and verdict(same) == UNRESOLVED


def test_one_seed_interval_matches_the_binomial_variance():
    # S = 1, D holds k ones among Q: the bootstrap mean has variance p (1 - p) / Q, p = k / Q.
    q, k = 400, 60
    d = np.zeros((1, q))
    d[0, :k] = 1
    c = paired_bootstrap(d, np.zeros((1, q)), replicates=20_000)
    p = k / q
    se = math.sqrt(p * (1 - p) / q)
    assert c["se"] == pytest.approx(se, rel=0.03)
    assert c["lo"] == pytest.approx(p - 1.96 * se, abs=0.15 * se) and c["hi"] == pytest.approx(p + 1.96 * se,
                                                                                              abs=0.15 * se)


def test_replicates_follow_the_enumerated_two_way_bootstrap():
    d = np.array([[1.0, 0.0, -1.0], [1.0, 1.0, 0.0]])   # two seeds, three questions: 4 x 27 = 108 outcomes
    exact = _exact(d)
    c = paired_bootstrap(d, np.zeros_like(d), replicates=40_000, seed=3)
    assert c["paired_by"] == "question and seed" and c["mean"] == pytest.approx(d.mean(), abs=1e-15)
    assert c["se"] == pytest.approx(exact.std(), rel=0.03)
    lo, hi = np.quantile(exact, [0.025, 0.975])
    assert (c["lo"], c["hi"]) == (lo, hi)   # both quantiles sit inside flat stretches of the exact distribution
    only_q = paired_bootstrap(d, np.zeros_like(d), replicates=40_000, resample_seeds=False)
    assert only_q["se"] == pytest.approx(_exact(d, resample_seeds=False).std(), rel=0.03)


def test_seed_to_seed_spread_widens_the_interval():
    # Seed 0 always wins, seed 1 always loses: no question resample sees it, the seed resample does
    # (means +1, 0, -1 with probabilities 1/4, 1/2, 1/4).
    a = np.array([np.ones(20), np.zeros(20)])
    b = np.array([np.zeros(20), np.ones(20)])
    c = paired_bootstrap(a, b)
    assert (c["mean"], c["lo"], c["hi"]) == (0.0, -1.0, 1.0)
    q_only = paired_bootstrap(a, b, resample_seeds=False)
    assert (q_only["lo"], q_only["hi"]) == (0.0, 0.0)


def test_pairing_resolves_what_the_accuracies_alone_cannot():
    # B is A with 10 of 500 wrong answers made right: accuracies 2 points apart, well inside the unpaired
    # spread (sqrt(2 * 0.7 * 0.3 / 500) = 2.9 points), but every question that differs favours B.
    rng = np.random.default_rng(0)
    a = (rng.random((1, 500)) < 0.7).astype(float)
    b = a.copy()
    b[0, np.flatnonzero(a[0] == 0)[:10]] = 1
    c = paired_bootstrap(a, b)
    assert c["mean"] == pytest.approx(-0.02) and c["hi"] < 0 and verdict(c) == WORSE


def test_a_baseline_without_seeds_pairs_with_every_seed():
    a = np.array([[1, 1, 0, 0], [1, 0, 1, 0]])
    c = paired_bootstrap(a, [0, 0, 0, 1])
    assert c["mean"] == pytest.approx(0.25) and c["n_seeds"] == 2 and c["n_questions"] == 4
    assert c == paired_bootstrap(a, np.array([[0, 0, 0, 1]] * 2))   # broadcast = the same row per seed


def test_same_inputs_same_interval_and_seeded():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, (3, 200)), rng.integers(0, 2, (3, 200))
    assert paired_bootstrap(a, b, seed=5) == paired_bootstrap(a, b, seed=5)
    assert paired_bootstrap(a, b, seed=5)["lo"] != paired_bootstrap(a, b, seed=6)["lo"]


@pytest.mark.parametrize(("a", "b", "kw", "match"), [
    ([[1, 0]], [[1, 0, 1]], {}, r"b must be \[1 or 1, 2\]"),
    (np.ones((3, 4)), np.ones((2, 4)), {}, r"b must be \[3 or 1, 4\]"),
    (np.ones((0, 4)), np.ones((1, 4)), {}, "a must be"),
    ([[1, math.nan]], [[0, 0]], {}, "a holds a non-finite"),
    ([[1, 0]], [[0, 0]], {"replicates": 10}, "replicates must be"),
    ([[1, 0]], [[0, 0]], {"level": 1.0}, "level must lie"),
])
def test_bad_input_names_the_problem(a, b, kw, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(a, b, **kw)


def test_verdict_needs_an_interval_that_excludes_zero():
    assert verdict({"lo": 0.001, "hi": 0.2}) == BETTER and verdict({"lo": -0.2, "hi": -1e-9}) == WORSE
    assert verdict({"lo": 0.0, "hi": 0.3}) == UNRESOLVED and verdict({"lo": -0.3, "hi": 0.0}) == UNRESOLVED
    with pytest.raises(ValueError, match="lo <= hi"):
        verdict({"lo": math.nan, "hi": 0.1})
    with pytest.raises(ValueError, match="lo <= hi"):
        verdict({"lo": 0.2, "hi": 0.1})
