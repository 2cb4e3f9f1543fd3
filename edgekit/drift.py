"""Input drift: a compact sketch of what a model saw at compile time, and how far live inputs have moved from it.

The compiler sketches the calibration inputs (and the model's outputs on them) into a `DriftReference` carried in
the manifest; the agent bins every live input the same way and scores its recent window against the sketch
(`edgekit.agents.drift`). Both sides compute features with `sample_features`, so they cannot disagree on them.

Features, per sample: for each float input batched on axis 0, the mean and the standard deviation of each colour
channel (image inputs of up to `MAX_CHANNELS` channels) or of the whole sample; and, for a classifier, the top-1
confidence. Each feature keeps quantile bin edges of the reference (~10 bins, so about equally full) and the
reference fraction in each bin.

The score is the Population Stability Index per feature, PSI = Σ (a − e) · ln(a / e) over the bins (e: reference
fraction, a: live fraction), and the drift score is the largest over the features. PSI rather than
- KL divergence: KL is asymmetric and undefined (infinite) as soon as a bin is empty on one side; PSI is KL summed
  both ways, symmetric, and the pseudo-count below keeps it finite;
- a Kolmogorov-Smirnov test: KS needs the raw reference samples on the device and sorts the live window per score;
  PSI needs only the bin edges (a few KiB in the manifest) and per inference one binary search per feature, so its
  cost is bounded and small;
- and PSI has thresholds practitioners know: under 0.1 stable, 0.1-0.25 moderate shift, over 0.25 a large one.

Empty bins: every count gets half a sample more (a Jeffreys pseudo-count) before it becomes a fraction, so a bin
that a short window happens to miss costs a bounded amount instead of ln(0). A finite window also scores above 0 on
identical data: about (bins − 1) · (1/window + 1/reference samples) per feature on average (0.06 for 10 bins, a
window of 200 and 1,000 reference samples), which is why the agent scores only full windows (docs/health.md).

numpy is imported where it is used: the manifest imports this module, and the hub reads manifests without numpy.
"""

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from edgekit.schema import WireModel

if TYPE_CHECKING:
    import numpy as np

DEFAULT_BINS = 10
MAX_BINS = 20
MAX_FEATURES = 16  # with MAX_BINS, a reference stays under ~8 KiB of manifest JSON (asserted in tests/test_drift.py)
MAX_CHANNELS = 4  # wider inputs (feature maps, embeddings) get whole-sample features, not one pair per channel
MIN_REFERENCE_SAMPLES = 50  # fewer put bin edges at chance places
PSEUDO_COUNT = 0.5
EPSILON = 1e-6  # floor for fractions handed to `psi` directly (the pseudo-count keeps the sketch's above it)
SIGNIFICANT_DIGITS = 6  # edges are rounded before the reference fractions are counted, so both sides bin alike
MODERATE = 0.1
LARGE = 0.25  # the hub's default alert threshold (edgekit hub --drift-threshold)
# A row within this of summing to 1 already is a distribution (an int8 softmax is off by several 1/256 steps): the
# rule the agent's results follow (edgekit.agents.postprocess.probabilities), so confidence means the same in both.
SUMS_TO_ONE = 1 / 64

Statistic = Literal["mean", "std", "confidence"]


class DriftFeature(WireModel):
    """One per-sample statistic: its bins' edges and the reference fraction of samples in each bin."""

    name: str = Field(max_length=64, description="e.g. 'image.mean[0]' (channel 0), 'image.std', 'confidence'")
    statistic: Statistic
    input: str | None = Field(None, max_length=64, description="The model input it reads; None for confidence")
    channel: int | None = Field(None, ge=0, lt=MAX_CHANNELS, description="None: the whole sample")
    edges: list[float] = Field(max_length=MAX_BINS - 1, description="Ascending; bin i holds edges[i-1] <= x < edges[i]")
    fractions: list[float] = Field(min_length=1, max_length=MAX_BINS, description="len(edges) + 1, smoothed, sum 1")

    @model_validator(mode="after")
    def _consistent(self) -> "DriftFeature":
        if len(self.fractions) != len(self.edges) + 1:
            raise ValueError(f"{self.name}: {len(self.edges)} edges need {len(self.edges) + 1} fractions")
        if any(not math.isfinite(edge) for edge in self.edges) or any(
            b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)
        ):
            raise ValueError(f"{self.name}: edges must be finite and strictly ascending")
        if any(not 0 < f <= 1 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-3:
            raise ValueError(f"{self.name}: fractions must each be in (0, 1] and sum to 1")
        if (self.statistic == "confidence") != (self.input is None):
            raise ValueError(f"{self.name}: a confidence feature reads the output, the others name an input")
        return self


class DriftReference(WireModel):
    """The sketch a bundle carries (`Manifest.drift_reference`); bounded by MAX_FEATURES × MAX_BINS."""

    samples: int = Field(ge=MIN_REFERENCE_SAMPLES, description="Reference samples the fractions were counted on")
    channel_axes: dict[str, int | None] = Field(
        max_length=MAX_FEATURES, description="Per input read: the item axis of its channels; None: whole samples"
    )
    features: list[DriftFeature] = Field(min_length=1, max_length=MAX_FEATURES)

    @model_validator(mode="after")
    def _inputs_known(self) -> "DriftReference":
        for feature in self.features:
            if feature.input is not None and feature.input not in self.channel_axes:
                raise ValueError(f"{feature.name}: input '{feature.input}' is not in channel_axes")
            if feature.channel is not None and feature.input and self.channel_axes[feature.input] is None:
                raise ValueError(f"{feature.name}: a channel of input '{feature.input}', which has no channel axis")
        return self


def psi(expected: Sequence[float], actual: Sequence[float], epsilon: float = EPSILON) -> float:
    """Population Stability Index of two binnings (fractions); bins under `epsilon` count as `epsilon`."""
    if len(expected) != len(actual):
        raise ValueError(f"psi: {len(expected)} expected bins, {len(actual)} actual")
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, epsilon), max(a, epsilon)
        total += (a - e) * math.log(a / e)
    return total


def smoothed_fractions(counts: "np.ndarray") -> list[float]:
    """Counts per bin → fractions, each count half a sample more (so no bin is empty)."""
    padded = counts.astype(float) + PSEUDO_COUNT
    return [float(f) for f in padded / padded.sum()]


def confidences(output: "np.ndarray") -> "np.ndarray | None":
    """Top-1 probability per sample of a classifier output ((N, classes) or (N, classes, 1, 1)); None for others.

    Softmax unless a row already is a distribution (a model ending in softmax), as the agent's results do."""
    import numpy as np

    if output.dtype.kind != "f" or output.ndim < 2 or output.shape[1] < 2 or any(d != 1 for d in output.shape[2:]):
        return None
    rows = output.reshape(output.shape[0], output.shape[1]).astype(np.float64)
    distributions = (rows.min(axis=1) >= 0) & (np.abs(rows.sum(axis=1) - 1) < SUMS_TO_ONE)
    shifted = np.exp(rows - rows.max(axis=1, keepdims=True))
    softmax_top = 1 / shifted.sum(axis=1)  # the max's own term is exp(0) = 1
    top: np.ndarray = np.where(distributions, rows.max(axis=1), softmax_top)
    return top


def channel_axis(layout: str, item_ndim: int, channels: int) -> int | None:
    """The item axis that holds colour channels for an image layout with few enough of them; else None."""
    if item_ndim != 3 or channels > MAX_CHANNELS:
        return None
    return {"NCHW": 0, "NHWC": 2}.get(layout)


def input_statistics(items: "np.ndarray", axis: int | None) -> tuple["np.ndarray", "np.ndarray"]:
    """(means, stds), each (N, channels), of item-major samples; one column when `axis` is None.

    One pass for the sum and one for the sum of squares (einsum), in the input's own precision: numpy sums float32
    pairwise, accurate to ~1e-6 here, and float64 passes cost three times as much (80 vs 25 µs at 3×224×224)."""
    import numpy as np

    count = items.shape[0]
    if axis is None:
        flat = items.reshape(count, 1, -1)
    else:
        flat = np.moveaxis(items, axis + 1, 1).reshape(count, items.shape[axis + 1], -1)
    size = flat.shape[2]
    means = flat.sum(axis=2).astype(np.float64) / size
    squares = np.einsum("ncp,ncp->nc", flat, flat).astype(np.float64) / size
    return means, np.sqrt(np.maximum(squares - means**2, 0.0))


def sample_features(
    reference: DriftReference, inputs: Mapping[str, "np.ndarray"], output: "np.ndarray | None"
) -> "np.ndarray | None":
    """(N, features) values of `reference.features` for N item-major samples (feeds batched on axis 0 are), or
    None when the samples lack an input, a channel or a classifier output the reference reads."""
    import numpy as np

    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    columns = []
    for feature in reference.features:
        if feature.input is None:
            values = confidences(output) if output is not None else None
        else:
            array = inputs.get(feature.input)
            if array is None or array.dtype.kind != "f":
                return None
            if feature.input not in stats:
                stats[feature.input] = input_statistics(array, reference.channel_axes[feature.input])
            means, stds = stats[feature.input]
            column = feature.channel or 0
            if column >= means.shape[1]:
                return None
            values = (means if feature.statistic == "mean" else stds)[:, column]
        if values is None:
            return None
        columns.append(values)
    return np.stack(columns, axis=1)


def bin_indices(edges: Sequence["np.ndarray"], values: "np.ndarray") -> "np.ndarray":
    """(N, features) bin index of each value: a binary search in its feature's edges (as arrays: a list would be
    converted on every call)."""
    import numpy as np

    return np.stack([np.searchsorted(e, values[:, i], side="right") for i, e in enumerate(edges)], axis=1)


def build_reference(
    inputs: Mapping[str, "np.ndarray"],
    layouts: Mapping[str, str],
    output: "np.ndarray | None" = None,
    bins: int = DEFAULT_BINS,
) -> DriftReference:
    """The sketch of N item-major samples of the float inputs named in `layouts` (input → 'NCHW', 'NHWC', …) and,
    when given, the model's first output on them (a classifier's adds the confidence feature). Raises ValueError
    for fewer than MIN_REFERENCE_SAMPLES samples or more than MAX_BINS bins."""
    if not 2 <= bins <= MAX_BINS:
        raise ValueError(f"bins {bins}: expected 2 to {MAX_BINS}")
    count = min(len(array) for array in inputs.values()) if inputs else 0
    if count < MIN_REFERENCE_SAMPLES:
        raise ValueError(f"{count} samples: a drift reference needs at least {MIN_REFERENCE_SAMPLES}")
    axes: dict[str, int | None] = {}
    features: list[DriftFeature] = []
    confidence = confidences(output[:count]) if output is not None else None
    if confidence is not None:  # first, so the cap on features never drops it
        features.append(_feature("confidence", "confidence", None, None, confidence, bins))
    for name, layout in layouts.items():
        array = inputs[name][:count]
        axes[name] = channel_axis(layout, array.ndim - 1, array.shape[1] if layout == "NCHW" else array.shape[-1])
        features += _input_features(name, array, axes[name], bins)
    used = features[:MAX_FEATURES]
    return DriftReference(
        samples=count, channel_axes={n: a for n, a in axes.items() if any(f.input == n for f in used)}, features=used
    )


def _input_features(name: str, items: "np.ndarray", axis: int | None, bins: int) -> list[DriftFeature]:
    """Mean and std of each channel of input `name` (of the whole sample when `axis` is None)."""
    means, stds = input_statistics(items, axis)
    features = []
    for column in range(means.shape[1]):
        channel = column if axis is not None else None
        suffix = f"[{channel}]" if channel is not None else ""
        features.append(_feature(f"{name}.mean{suffix}", "mean", name, channel, means[:, column], bins))
        features.append(_feature(f"{name}.std{suffix}", "std", name, channel, stds[:, column], bins))
    return features


def _feature(
    name: str, statistic: Statistic, input_name: str | None, channel: int | None, values: "np.ndarray", bins: int
) -> DriftFeature:
    """Quantile edges (rounded, duplicates merged: a feature often piles up on one value, e.g. confidence 1.0) and
    the smoothed fraction of `values` in each bin."""
    import numpy as np

    quantiles = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    edges = sorted({float(f"{q:.{SIGNIFICANT_DIGITS}g}") for q in quantiles})
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    fractions = [float(f"{f:.{SIGNIFICANT_DIGITS}g}") for f in smoothed_fractions(counts)]
    return DriftFeature(name=name, statistic=statistic, input=input_name, channel=channel, edges=edges,
                        fractions=fractions)  # fmt: skip


def drift_scores(reference: DriftReference, counts: Sequence[Sequence[int]]) -> list[float]:
    """PSI of each feature: the reference's fractions against live `counts` per bin (smoothed like the reference)."""
    import numpy as np

    return [
        psi(feature.fractions, smoothed_fractions(np.asarray(live[: len(feature.fractions)])))
        for feature, live in zip(reference.features, counts, strict=True)
    ]
