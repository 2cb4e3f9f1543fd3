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
device to measure it on (e.g. no baseline) passes, and says so. A p95 gate also passes when the median difference
is at most `P95_NOISE_MS`: p95 over tens of samples is the slowest few, and scheduling on a busy device moves those
by a millisecond or more (measured: a 0.2 ms model's p95 went to 1.0 ms with nothing changed but the load), so a
sub-millisecond model would fail any factor.
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


def _latency(new: float | None, old: float | None) -> dict[str, Any]:
    """The p95 ratio new/old and the difference in ms, None when either is unknown."""
    if new is None or not old:
        return {"p95": None, "p95_delta_ms": None}
    return {"p95": round(new / old, 4), "p95_delta_ms": round(new - old, 3)}


def shadow_measurement(health: dict[str, Any] | None, bundle_id: str, min_samples: int) -> dict[str, Any] | None:
    """What the gates read from a device's newest ShadowStats of `bundle_id`, once it has `min_samples`."""
    shadow = (health or {}).get("shadow") or {}
    samples, errors = shadow.get("samples", 0), shadow.get("errors", 0)
    if shadow.get("bundle") != bundle_id or samples < max(min_samples, 1):
        return None
    return {"samples": samples, "agreement": shadow.get("agreement"), "errors": errors,
            "error_rate": round(errors / (samples + errors), 6),
            **_latency(shadow.get("latency_p95_ms"), shadow.get("active_p95_ms"))}  # fmt: skip


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
            **_latency(model.get("latency_p95_ms"), baseline.get("latency_p95_ms")),
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
        elif gate.metric == "p95" and not passed and _within_noise(measured):
            passed, note = True, f"p95 within {P95_NOISE_MS:g} ms of the previous bundle's: scheduling noise"
        results.append({"phase": phase, "wave": wave, "gate": str(gate), "metric": gate.metric, "value": value,
                         "threshold": gate.threshold, "passed": passed, "devices": devices, "note": note})  # fmt: skip
    return results


def _within_noise(measured: list[dict[str, Any]]) -> bool:
    deltas = [m["p95_delta_ms"] for m in measured if m.get("p95_delta_ms") is not None]
    return bool(deltas) and statistics.median(deltas) <= P95_NOISE_MS


def failed_gates(results: list[dict[str, Any]]) -> str:
    """The reason a set of gate results halts a deployment; '' when every gate passed."""
    failed = [r for r in results if not r["passed"]]
    if not failed:
        return ""
    where = "the shadow phase" if failed[0]["phase"] == "shadow" else f"wave {failed[0]['wave']}"
    causes = "; ".join(f"{r['gate']} failed: measured {r['value']:g} on {r['devices']} devices" for r in failed)
    return f"health gate in {where}: {causes}"
