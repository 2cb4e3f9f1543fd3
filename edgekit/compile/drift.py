"""The bundle's drift reference (`edgekit.drift`): a sketch of the inputs compile calibrated and verified on, and of
the chosen model's outputs on them, that the agent scores live inputs against.

The outputs are the bundle's own model's (or its host stand-in's), not fp32's: the device scores what it computes,
and an int8 model's confidences differ from fp32's (its softmax moves in steps of 1/256, so 0.9999 reads 0.996): a
reference from fp32 put the int8 digits demo's own held-out video at a confidence PSI of 4.4."""

import numpy as np

from edgekit.agents.runtimes import Session, run_batches
from edgekit.drift import MIN_REFERENCE_SAMPLES, DriftReference, build_reference
from edgekit.manifest import TensorSpec
from edgekit.samples import SampleSet, feed_size

# Quantiles of ~10 bins settle well before this; more samples would only cost fp32 inference time at compile.
MAX_REFERENCE_SAMPLES = 2000


def drift_reference(
    inputs: list[TensorSpec],
    verified: SampleSet,
    verified_outputs: list[np.ndarray],
    calibration: SampleSet | None,
    session: Session,
    synthetic: bool,
) -> tuple[DriftReference | None, str]:
    """(reference or None, what it was built from or why there is none, for the report).

    Built from the verification samples (the chosen model's outputs on them are at hand) and, when they are another
    set, from the calibration samples too (run through `session`, the chosen model), at most MAX_REFERENCE_SAMPLES
    in all."""
    if synthetic:
        return None, "none: the samples are synthetic (no --calibration), so they say nothing about field inputs"
    layouts = {s.name: s.layout for s in inputs if s.batch_axis == 0 and np.dtype(s.dtype).kind == "f"}
    if not layouts:
        return None, "none: the model has no float input batched on axis 0 to sketch"
    batch = feed_size(inputs)
    used = (len(verified) // batch) * batch  # the verifier's feeds leave out a remainder smaller than a batch
    parts = [(verified.subset(np.arange(used)), verified_outputs[0][:used] if verified_outputs else None)]
    room = MAX_REFERENCE_SAMPLES - used
    if calibration is not None and calibration is not verified and room >= batch:
        extra = _sample(calibration, min(room, len(calibration)) // batch * batch)
        parts.append((extra, run_batches(session, list(extra.batches(batch)))[0]))
    samples = {name: np.concatenate([p.inputs[name] for p, _ in parts])[:MAX_REFERENCE_SAMPLES] for name in layouts}
    count = len(next(iter(samples.values())))
    if count < MIN_REFERENCE_SAMPLES:
        return None, f"none: {count} samples, and a drift reference needs at least {MIN_REFERENCE_SAMPLES}"
    output = _joined_outputs([out for _, out in parts], count)
    try:
        reference = build_reference(samples, layouts, output)
    except ValueError as error:  # e.g. NaN in the inputs: the bundle is still good, only without drift figures
        return None, f"none: {error}"
    names = ", ".join(f.name for f in reference.features)
    return reference, f"{len(reference.features)} features ({names}) from {count} calibration and held-out samples"


def _sample(samples: SampleSet, count: int) -> SampleSet:
    """`count` samples spread over the set (seeded), not its first ones: folders are often sorted by class."""
    chosen = np.random.default_rng(0).choice(len(samples), size=count, replace=False)
    return samples.subset(np.sort(chosen))


def _joined_outputs(outputs: list[np.ndarray | None], count: int) -> np.ndarray | None:
    """The first output of every part, one row per sample, or None when a part has none or rows do not line up
    with samples (an output not batched on axis 0)."""
    if any(out is None for out in outputs):
        return None
    joined = np.concatenate(outputs)
    return joined[:count] if len(joined) >= count else None
