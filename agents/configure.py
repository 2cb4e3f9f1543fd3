"""A desired state's configuration (source, task, thresholds, rates and whatever else `CONFIG_FIELDS` names) taken
all or nothing: a source that does not parse or does not open on this device (`camera:7`, a missing video file)
refuses the whole configuration, and the device keeps its previous one while the rest of the desired state (the
bundle, the shadow) still applies. The refusal goes back in the reported state (`ConfigState`)."""

from typing import Any

from edgekit.agents.runner import Runner
from edgekit.agents.sources import SourceConfig, SourceContext, SourceUnavailable, create_source, parse_source
from edgekit.errors import EdgekitError
from edgekit.protocol import CONFIG_FIELDS, DesiredState


class ConfigRefused(Exception):
    """The configuration cannot be applied on this device; the message says which field and why."""


def check_config(desired: DesiredState, runner: Runner, device_id: str) -> None:
    """Raise ConfigRefused when `desired`'s configuration cannot be applied here; schema checks already passed."""
    if desired.source is not None:
        _check_source(desired.source, runner, device_id)


def _check_source(spec: str | dict[str, Any], runner: Runner, device_id: str) -> None:
    try:
        config = parse_source(spec)
    except EdgekitError as error:
        raise ConfigRefused(f"source: {error}") from None
    if _same_device(config, runner.source_config) or runner.model is None:
        return  # open already (a camera cannot be opened twice), or nothing to feed yet: opened when a model is
    _probe(config, SourceContext(device_id, runner.model.bundle.manifest.inputs[0], _no_subscriptions))


def _same_device(config: SourceConfig, running: SourceConfig | None) -> bool:
    """Whether `config` reads what the running source reads (other options, e.g. a camera's width): it is there."""
    identity = ("kind", "index", "path", "topic")
    return running is not None and all(getattr(config, n, None) == getattr(running, n, None) for n in identity)


def _probe(config: SourceConfig, context: SourceContext) -> None:
    """Open the source once and close it: what is not on this device fails here, before anything changes."""
    try:
        source = create_source(config, context)
        try:
            source.open()
        finally:
            source.close()
    except (EdgekitError, SourceUnavailable) as error:
        raise ConfigRefused(f"source {config.kind}: {error}") from None


def _no_subscriptions(_topic: str, _callback: Any) -> None:
    """A probe of an MQTT source subscribes to nothing (the context has no unsubscribe)."""


def keep_previous(desired: DesiredState, previous: DesiredState | None) -> DesiredState:
    """`desired` with the configuration of `previous` (the defaults when there is none): what a device converges to
    when it refuses `desired`'s configuration."""
    kept = previous if previous is not None else DesiredState(rev=desired.rev)
    return desired.model_copy(update={name: getattr(kept, name) for name in CONFIG_FIELDS})
