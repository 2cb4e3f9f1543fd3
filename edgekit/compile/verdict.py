"""Accuracy verdicts that respect sample size.

A held-out set of n samples resolves top-1 differences only in steps of 100/n points: on 5 samples one flipped
prediction is 20 points. So every figure comes with a 95% confidence interval, and a candidate is rejected only
when it misses the budget by more than one sample's worth: no single flipped sample decides a verdict.
"""

import math
from dataclasses import dataclass

import numpy as np

from edgekit.compile.measure import Agreement, predictions
from edgekit.compile.report import Verdict

Z95 = 1.959964
# A classifier is judged by top-1, but scores this unlike fp32's in a typical sample are broken even where the
# argmax still agrees (constant outputs tie every argmax at class 0); int8 scores stay far above it. The median
# per sample, so that a few flipped samples (whose one-hot-like scores differ a lot) do not count.
COLLAPSED_COSINE = 0.9


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound for small n and for proportions near 0 or 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_drop_interval(lost: int, gained: int, n: int) -> tuple[float, float]:
    """95% interval, in points, of the accuracy drop between two classifiers judged on the same n samples, from the
    discordant pairs: `lost` (reference right, candidate wrong) and `gained` (the other way round)."""
    drop = (lost - gained) / n
    variance = max(0.0, (lost + gained) / n - drop**2) / n
    half = Z95 * math.sqrt(variance)
    return 100 * (drop - half), 100 * (drop + half)


@dataclass(frozen=True)
class Budget:
    max_accuracy_drop: float  # top-1 points, classifiers
    min_cosine: float  # other outputs


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str | None  # why the candidate is outside the budget, or None
    miss: float | None = None  # how far outside, in the gate's own unit (points, or cosine)
    accept_with: str | None = None  # the flag that would accept it


def judge(
    reference: list[np.ndarray], candidate: list[np.ndarray], labels: np.ndarray | None, agreement: Agreement,
    names: list[str], budget: Budget,
) -> Judgement:  # fmt: skip
    """Judge a candidate's outputs against the reference's on the same held-out samples."""
    ref_classes, got_classes = predictions(reference[0]), predictions(candidate[0])
    per_output = {
        "output_cosine": {n: o.cosine for n, o in zip(names, agreement.outputs, strict=True) if o.cosine is not None},
        "output_snr_db": {n: o.snr_db for n, o in zip(names, agreement.outputs, strict=True) if o.snr_db is not None},
        "output_exact": {n: o.exact for n, o in zip(names, agreement.outputs, strict=True) if o.exact is not None},
    }
    if ref_classes is None or got_classes is None:
        verdict = Verdict(samples=len(reference[0]), **per_output)
        return _judge_cosine(verdict, agreement.cosine, budget.min_cosine)
    n = len(ref_classes)
    disagreements = int(np.sum(ref_classes != got_classes))
    low, high = wilson_interval(n - disagreements, n)
    verdict = Verdict(
        samples=n, sample_points=100 / n, top1_disagreements=disagreements, top1_agreement_ci=(low, high),
        **per_output,
    )  # fmt: skip
    typical = _median_sample_cosine(reference[0], candidate[0])
    if typical < COLLAPSED_COSINE:
        return Judgement(
            verdict,
            f"the scores no longer resemble fp32's (median cosine per sample {typical:.3f} < {COLLAPSED_COSINE}), "
            "whatever their top-1 says",
        )
    if labels is not None and len(labels) == n:
        return _judge_accuracy(verdict, ref_classes == labels, got_classes == labels, budget.max_accuracy_drop)
    return _judge_agreement(verdict, disagreements, budget.max_accuracy_drop)


def _median_sample_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.dtype.kind != "f":
        return 1.0  # integer labels: compared exactly, nothing to collapse
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    got = candidate.reshape(len(candidate), -1).astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    dots = np.sum(ref * got, axis=1)
    same = np.all(ref == got, axis=1)
    cosines = np.where(norms > 0, dots / np.where(norms > 0, norms, 1), same.astype(np.float64))
    return float(np.median(cosines))


def _judge_cosine(verdict: Verdict, cosine: float | None, min_cosine: float) -> Judgement:
    if cosine is None or cosine >= min_cosine:
        return Judgement(verdict, None)
    accept = math.floor(cosine * 10_000) / 10_000
    return Judgement(verdict, f"cosine {cosine:.5f} < {min_cosine}", min_cosine - cosine, f"--min-cosine {accept}")


def _judge_accuracy(verdict: Verdict, ref_right: np.ndarray, got_right: np.ndarray, budget: float) -> Judgement:
    n = len(ref_right)
    lost, gained = int(np.sum(ref_right & ~got_right)), int(np.sum(~ref_right & got_right))
    drop = 100 * (lost - gained) / n
    verdict = verdict.model_copy(
        update={"accuracy_drop_points": drop, "accuracy_drop_ci": paired_drop_interval(lost, gained, n)}
    )
    if not _beyond_one_sample(lost - gained, n, budget):
        return Judgement(verdict, None)
    return Judgement(
        verdict,
        f"top-1 accuracy drops {drop:.2f} points (budget {budget}; {_interval(verdict.accuracy_drop_ci)})",
        drop - budget,
        f"--max-accuracy-drop {_round_up(drop)}",
    )


def _judge_agreement(verdict: Verdict, disagreements: int, budget: float) -> Judgement:
    n = verdict.samples
    if not _beyond_one_sample(disagreements, n, budget):
        return Judgement(verdict, None)
    points = 100 * disagreements / n
    low, high = verdict.top1_agreement_ci
    return Judgement(
        verdict,
        f"top-1 differs from fp32 on {points:.2f}% of {n} samples (budget {budget}; "
        f"agreement 95% CI {100 * low:.1f}-{100 * high:.1f}%)",
        points - budget,
        f"--max-accuracy-drop {_round_up(points)}",
    )


def _beyond_one_sample(flips: int, n: int, budget: float) -> bool:
    """Over budget even with one flipped sample forgiven. The tolerance absorbs float arithmetic at exactly the
    budget (99.0 - 98.0 on 200 samples is 1.0000000000000009)."""
    return 100 * (flips - 1) / n > budget + 1e-9


def _interval(ci: tuple[float, float] | None) -> str:
    return f"95% CI {ci[0]:.1f} to {ci[1]:.1f}" if ci else "no interval"


def _round_up(points: float) -> float:
    return math.ceil(points * 10 - 1e-9) / 10
