"""Health gates: what a rollout measures on its devices, from their telemetry, before it goes on.

A gate is `METRIC OP THRESHOLD`, e.g. `agreement>=0.98` or `p95<=1.2x`:
- `agreement` (shadow phase): the shadow's mean agreement with the active bundle on the same live inputs
  (`ShadowStats.agreement`: top-1 for classifiers, matched boxes for detectors, cosine for raw outputs);
- `p95` (a factor, `x`): the new bundle's p95 latency over the old one's on the same device. In the shadow phase
  both ran on the same inputs in the same process (`ShadowStats`); in a wave, the new bundle's `ModelStats` against
  the one the device sent for its previous bundle before the deployment started (the member's `baseline`);
- `errors`: the share of inferences that failed (exception, NaN);
- `shift` (waves): how far the top-1 class histogram moved from the previous bundle's on the same device, as the
  total variation distance (half the summed absolute difference of the two distributions: 0 same, 1 disjoint).
A device counts once it has `min_samples` measured inputs. A wave's value is the sample-weighted mean (agreement,
shift), the total (errors) or the median over devices (p95: one slow device is not the fleet); a gate with no
device to measure it on (e.g. no baseline) passes, and says so.

A p95 over its factor fails only when the bundle, not the device, made it slower: p95 over tens of samples is the
slowest few, and on a loaded device those are the scheduler's (measured: the same 0.3 ms model's p95 ranged from 2.9
to 10.5 ms across five agents on a 2-core machine with two busy processes beside them, its p50 from 0.25 to 0.39 ms).
So it also passes when the median p95 difference is at most `P95_NOISE_MS`, or when the median latency (p50) did not
move with it: by at most the gate's factor or `P50_NOISE_MS`. In the shadow phase the factor is widened by the
thread count the shadow lacks (it runs on one thread beside an active bundle that may use all cores: a shadow up to
that many times slower may be as fast once active); after the switch, the canary's wave measures it again on the
active's threads.
"""

import re
import statistics
from typing import Any, Literal

from pydantic import BaseModel

from edgekit.errors import BadInput

Metric = Literal["agreement", "p95", "errors", "shift"]
PHASE_METRICS = {"shadow": ("agreement", "p95", "errors"), "waves": ("p95", "errors", "shift")}
GATE = re.compile(r"^\s*(agreement|p95|errors|shift)\s*(>=|<=)\s*(\d+(?:\.\d+)?)\s*(x?)\s*$")
# With --shadow and no --gate: the shadow must agree on 95 % of inputs, be at most 1.5x slower at p95, fail on at
# most 1 % of them, and after the switch the class histogram may move by at most 0.3 (docs/health.md).
DEFAULT_GATES = ("agreement>=0.95", "p95<=1.5x", "errors<=0.01", "shift<=0.3")
DEFAULT_MIN_SAMPLES = 50
P95_NOISE_MS = 2.0
P50_NOISE_MS = 0.5


class Gate(BaseModel):
    metric: Metric
    op: Literal[">=", "<="]
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}{'x' if self.metric == 'p95' else ''}"

    def passes(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold


def parse_gate(text: str) -> Gate:
    """`agreement>=0.98`, `p95<=1.2x`, `errors<=0.01`, `shift<=0.3`; BadInput naming what was expected."""
    match = GATE.match(text)
    if match is None:
        raise BadInput(f"gate '{text}': expected METRIC>=VALUE or METRIC<=VALUE with METRIC one of agreement, "
                       "p95 (a factor, e.g. p95<=1.2x), errors, shift")  # fmt: skip
    metric, op, value, factor = match.groups()
    if (metric == "p95") != bool(factor):
        raise BadInput(f"gate '{text}': p95 takes a factor of the previous bundle's (p95<=1.2x); "
                       f"{metric} takes a plain number")  # fmt: skip
    threshold = float(value)
    if metric in ("agreement", "errors", "shift") and threshold > 1:
        raise BadInput(f"gate '{text}': {metric} is a fraction from 0 to 1")
    return Gate(metric=metric, op=op, threshold=threshold)


def parse_gates(texts: list[str] | None, shadow: bool) -> list[Gate]:
    """The gates asked for; with none and a shadow phase, DEFAULT_GATES."""
    if not texts:
        texts = list(DEFAULT_GATES) if shadow else []
    gates = [parse_gate(text) for text in texts]
    if not shadow and any(gate.metric == "agreement" for gate in gates):
        raise BadInput("gate agreement needs a shadow phase (--shadow): only a shadow is compared input by input")
    return gates


# ---- per device ---------------------------------------------------------------------------------------------------


def _latency(new: dict[str, Any], old: dict[str, Any], p50: str, p95: str) -> dict[str, Any]:
    """The new/old ratio and the difference in ms of the p95 and the p50 (`p50`, `p95`: the keys in `old`); None
    where either is unknown."""
    figures: dict[str, Any] = {}
    for name, new_value, old_value in (("p95", new.get("latency_p95_ms"), old.get(p95)),
                                       ("p50", new.get("latency_p50_ms"), old.get(p50))):  # fmt: skip
        known = new_value is not None and bool(old_value)
        figures[name] = round(new_value / old_value, 4) if known else None
        figures[f"{name}_delta_ms"] = round(new_value - old_value, 3) if known else None
    return figures


def shadow_measurement(health: dict[str, Any] | None, bundle_id: str, min_samples: int) -> dict[str, Any] | None:
    """What the gates read from a device's newest ShadowStats of `bundle_id`, once it has `min_samples`."""
    shadow = (health or {}).get("shadow") or {}
    samples, errors = shadow.get("samples", 0), shadow.get("errors", 0)
    if shadow.get("bundle") != bundle_id or samples < max(min_samples, 1):
        return None
    threads, active_threads = shadow.get("threads"), shadow.get("active_threads")
    return {"samples": samples, "agreement": shadow.get("agreement"), "errors": errors,
            "error_rate": round(errors / (samples + errors), 6),
            **_latency(shadow, shadow, "active_p50_ms", "active_p95_ms"),
            "thread_factor": max(active_threads / threads, 1.0) if threads and active_threads else 1.0}  # fmt: skip


def model_measurement(health: dict[str, Any] | None, baseline: dict[str, Any] | None, bundle_id: str,
                      min_samples: int) -> dict[str, Any] | None:  # fmt: skip
    """What the gates read from a device's newest ModelStats of `bundle_id` against its `baseline` (the previous
    bundle's ModelStats), once it has `min_samples` inferences."""
    model = (health or {}).get("model") or {}
    inferences, errors = model.get("inferences", 0), model.get("errors", 0)
    if model.get("bundle") != bundle_id or inferences < max(min_samples, 1):
        return None
    baseline = baseline or {}
    return {"samples": inferences, "errors": errors, "error_rate": round(errors / (inferences + errors), 6),
            **_latency(model, baseline, "latency_p50_ms", "latency_p95_ms"),
            "shift": class_shift(model.get("classes"), baseline.get("classes"))}  # fmt: skip


def class_shift(new: dict[str, int] | None, old: dict[str, int] | None) -> float | None:
    """Total variation distance between two top-1 class histograms; None when either is empty."""
    new_total, old_total = sum((new or {}).values()), sum((old or {}).values())
    if not new_total or not old_total:
        return None
    keys = set(new or {}) | set(old or {})
    distance = sum(abs((new or {}).get(k, 0) / new_total - (old or {}).get(k, 0) / old_total) for k in keys) / 2
    return round(distance, 6)


# ---- per wave -----------------------------------------------------------------------------------------------------


def wave_value(metric: str, measured: list[dict[str, Any]]) -> tuple[float | None, int]:
    """The wave's value of `metric` over the devices that measured it, and how many did."""
    if metric == "errors":
        samples = sum(m["samples"] + m["errors"] for m in measured)
        return (round(sum(m["errors"] for m in measured) / samples, 6) if samples else None), len(measured)
    having = [m for m in measured if m.get(metric) is not None]
    if not having:
        return None, 0
    if metric == "p95":
        return round(statistics.median(m["p95"] for m in having), 4), len(having)
    weight = sum(m["samples"] for m in having)
    return round(sum(m[metric] * m["samples"] for m in having) / weight, 6), len(having)


def evaluate(gates: list[Gate], phase: str, wave: int, measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per gate that applies in `phase`: {phase, wave, gate, value, threshold, passed, devices, note}."""
    results = []
    for gate in gates:
        if gate.metric not in PHASE_METRICS[phase]:
            continue
        value, devices = wave_value(gate.metric, measured)
        passed, note = value is None or gate.passes(value), ""
        if value is None:
            note = "no device measured it (no baseline or no samples): not applied"
        elif gate.metric == "p95" and not passed:
            note = _latency_noise(gate, measured)
            passed = bool(note)
        results.append({"phase": phase, "wave": wave, "gate": str(gate), "metric": gate.metric, "value": value,
                         "threshold": gate.threshold, "passed": passed, "devices": devices, "note": note})  # fmt: skip
    return results


def _latency_noise(gate: Gate, measured: list[dict[str, Any]]) -> str:
    """Why a p95 over the gate's factor is the device's load rather than the bundle (module docstring); '' when
    nothing explains it away."""

    def median(key: str) -> float | None:
        values = [m[key] for m in measured if m.get(key) is not None]
        return statistics.median(values) if values else None

    p95_delta, p50, p50_delta = median("p95_delta_ms"), median("p50"), median("p50_delta_ms")
    factor = gate.threshold * (median("thread_factor") or 1.0)
    if p95_delta is not None and p95_delta <= P95_NOISE_MS:
        return f"p95 within {P95_NOISE_MS:g} ms of the previous bundle's: scheduling noise"
    if p50 is not None and p50_delta is not None and (p50 <= factor or p50_delta <= P50_NOISE_MS):
        threads = f" (widened to {factor:g}x for the shadow's fewer threads)" if factor > gate.threshold else ""
        return (
            f"the median latency moved {p50:g}x ({p50_delta:+g} ms), within {gate.threshold:g}x{threads} or "
            f"{P50_NOISE_MS:g} ms: the slow tail is the device's load, not the bundle"
        )
    return ""


def failed_gates(results: list[dict[str, Any]]) -> str:
    """The reason a set of gate results halts a deployment; '' when every gate passed."""
    failed = [r for r in results if not r["passed"]]
    if not failed:
        return ""
    where = "the shadow phase" if failed[0]["phase"] == "shadow" else f"wave {failed[0]['wave']}"
    causes = "; ".join(f"{r['gate']} failed: measured {r['value']:g} on {r['devices']} devices" for r in failed)
    return f"health gate in {where}: {causes}"
