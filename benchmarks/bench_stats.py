"""The statistics the benchmark scripts report: a paired-ratio median with a bootstrap CI, a range verdict, and the
rotating run order that lets machine noise hit every compared setting alike.

Verdicts are three-valued on purpose: a goal is only "meets" or "misses" when the spread of the measurement lies
wholly on one side of it; otherwise the run cannot tell, and says "not resolved" (measure longer or on a quieter
machine) instead of printing a point estimate that the next run may contradict.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MEETS, MISSES, NOT_RESOLVED = "meets", "misses", "not resolved"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def bootstrap_median_ci(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median of `values` (fixed seed: the same data, the same
    interval), so that a headline median carries how far it could move between runs."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size < 1:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {data.shape}")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    rng = np.random.default_rng(seed)
    medians = np.median(data[rng.integers(0, data.size, size=(resamples, data.size))], axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(low), float(high)


def ci_verdict(low: float, high: float, goal: float) -> str:
    """Verdict for an at-most goal (e.g. a time ratio <= 1.05) from a confidence interval: meets when the whole
    interval is at or below the goal, misses when it is wholly above, otherwise not resolved."""
    if low > high:
        raise ValueError(f"interval bounds out of order: {low} > {high}")
    if high <= goal:
        return MEETS
    if low > goal:
        return MISSES
    return NOT_RESOLVED


def range_verdict(values: Sequence[float], goal: float) -> str:
    """Verdict for an at-least goal (e.g. samples/s >= 100) from repeated samples: meets when the smallest sample
    reaches the goal, misses when even the largest falls short, otherwise (or from a single sample) not resolved."""
    if len(values) < 1:
        raise ValueError("values must not be empty")
    if len(values) < 2:  # one sample has no spread to lie on either side of the goal
        return NOT_RESOLVED
    if min(values) >= goal:
        return MEETS
    if max(values) < goal:
        return MISSES
    return NOT_RESOLVED


def paired_ratio_summary(numerator: Sequence[float], denominator: Sequence[float], goal: float,
                         resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Per-pair ratios numerator[i] / denominator[i] (paired samples cancel the drift that both share), their median
    (the headline), its bootstrap 95% CI, the interquartile range of the ratios, and the verdict against an
    at-most `goal`."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need equally many paired samples (>= 1), got {len(numerator)} and {len(denominator)}")
    ratios = np.asarray(numerator, dtype=np.float64) / np.asarray(denominator, dtype=np.float64)
    low, high = bootstrap_median_ci(ratios, resamples, seed)
    q1, q3 = np.percentile(ratios, [25, 75])
    verdict = ci_verdict(low, high, goal) if ratios.size > 1 else NOT_RESOLVED  # one pair: a zero-width interval
    return {
        "median": float(np.median(ratios)), "ci95": [low, high], "iqr": [float(q1), float(q3)],
        "ratios": ratios.tolist(), "pairs": int(ratios.size), "goal": goal, "verdict": verdict,
        "ci_method": f"percentile bootstrap of the median, {resamples} resamples, numpy seed {seed}",
    }


def range_summary(values: Sequence[float], goal: float) -> dict:
    """Median, min-max range and at-least `goal` verdict of repeated measurements of one figure."""
    if len(values) < 1:
        raise ValueError("values must not be empty")
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "runs": [float(v) for v in values], "goal": goal, "verdict": range_verdict(values, goal)}


def rotated(items: Sequence, repeat: int) -> list:
    """`items` rotated left by `repeat` (mod their number): run order of round `repeat`, so that over as many rounds
    as items each one runs in every position once (two items simply alternate)."""
    if not items:
        return []
    shift = repeat % len(items)
    return [*items[shift:], *items[:shift]]
