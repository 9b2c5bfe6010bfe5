"""The demo's verdicts: paired bootstrap intervals over questions and seeds, and the words they allow.

Every comparison in the demo is between two methods scored on the same questions, each trained once per seed of
the same seeds (a seed fixes a run's data order, so the two methods' runs of one seed are paired). A difference
"A - B" is the mean over seeds and questions of ``correct_A - correct_B``. Its uncertainty has two sources: the
questions (another draw of questions from the same task) and the seeds (another training run). The two-way paired
bootstrap below resamples both at once, with replacement, applying the same resample to A and to B; for a
one-seed comparison (a deterministic baseline such as RTN, or one seed) only the questions are resampled.

A verdict is "better" or "worse" only when the 95% interval excludes zero; otherwise "no resolved difference".
"""

from __future__ import annotations

import math

import numpy as np

BETTER, WORSE, UNRESOLVED = "better", "worse", "no resolved difference"
LEVEL = 0.95
REPLICATES = 10_000
_CHUNK = 1000   # replicates drawn at once: a [chunk, questions] index matrix


def _matrix(x, name: str) -> np.ndarray:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"{name} must be [seeds, questions] with at least one of each, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"{name} holds a non-finite value")
    return m


def paired_bootstrap(a, b, *, replicates: int = REPLICATES, level: float = LEVEL, seed: int = 0,
                     resample_seeds: bool = True) -> dict:
    """The difference A - B with a two-way paired bootstrap percentile interval.

    a: [S, Q] per-question scores of method A (1 correct, 0 wrong; any finite floats work), row s = the run of
    seed s; b: [S, Q] of method B on the same seeds and questions, or [1, Q] (or [Q]) for a baseline without
    seeds, compared with every seed of A. Each replicate draws Q question indices and (when ``resample_seeds``
    and S > 1) S seed indices uniformly with replacement, the same for A and B, and takes the mean of
    D = a - b over the drawn cells: sum_{s, q} c_s k_q D[s, q] / (S Q), where c and k count how often each seed
    and question was drawn. The interval is the (1 - level) / 2 and (1 + level) / 2 quantiles of the
    ``replicates`` means (numpy's linear interpolation), computed in float64 from numpy's PCG64 generator
    seeded with ``seed``: the same inputs give the same interval.

    Resampling both ways (Owen's pigeonhole bootstrap for crossed factors) estimates the variance of the mean
    over new questions and new seeds, slightly conservatively (the seed-by-question interaction is counted
    twice). With 3 seeds the seed resample is coarse; it can only widen the interval.

    Returns {"mean": the full-sample mean of D, "lo", "hi", "se": the replicates' standard deviation,
    "n_questions": Q, "n_seeds": S, "replicates", "level", "paired_by"}.

    Raises:
        ValueError: shapes that are not [S, Q] / [S or 1, Q] with S, Q >= 1, a non-finite score, replicates
            < 100, or level outside (0, 1).
    """
    a, b = _matrix(a, "a"), _matrix(b, "b")
    if b.shape[1] != a.shape[1] or b.shape[0] not in (1, a.shape[0]):
        raise ValueError(f"b must be [{a.shape[0]} or 1, {a.shape[1]}] to pair with a {list(a.shape)}, "
                         f"got {list(b.shape)}")
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 100:
        raise ValueError(f"replicates must be an integer >= 100, got {replicates!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    d = a - b
    n_seeds, n_q = d.shape
    rng = np.random.default_rng(seed)
    both = resample_seeds and n_seeds > 1
    means = np.empty(replicates, dtype=np.float64)
    for start in range(0, replicates, _CHUNK):
        n = min(_CHUNK, replicates - start)
        per_seed = d.T[rng.integers(0, n_q, size=(n, n_q))].mean(1)                # [n, S]
        if both:
            picked = np.take_along_axis(per_seed, rng.integers(0, n_seeds, size=(n, n_seeds)), axis=1)
            means[start:start + n] = picked.mean(1)
        else:
            means[start:start + n] = per_seed.mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "se": float(means.std(ddof=1)),
            "n_questions": n_q, "n_seeds": n_seeds, "replicates": replicates, "level": level,
            "paired_by": "question and seed" if both else "question"}


def verdict(c: dict) -> str:
    """"better" when the interval [lo, hi] lies above zero, "worse" below it, else "no resolved difference"
    (an interval touching zero resolves nothing).

    Raises:
        ValueError: lo or hi missing, NaN, or lo > hi.
    """
    lo, hi = c.get("lo"), c.get("hi")
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"an interval needs lo <= hi, both numbers, got lo={lo!r}, hi={hi!r}")
    if lo > 0:
        return BETTER
    if hi < 0:
        return WORSE
    return UNRESOLVED
