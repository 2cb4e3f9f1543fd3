"""API token scopes, weakest first: each allows what the ones before it allow. A module of its own, free of the
hub stack, so that `edgekit hub token create --scope` can offer them without importing it."""

from typing import Literal, get_args

Scope = Literal["read", "operate", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
# Least privilege that still does the daily work (push, deploy, halt, labels); admin is asked for by name.
DEFAULT_SCOPE: Scope = "operate"
SCOPE_HELP = {
    "read": "GET only: devices, bundles, deployments, events, audit, metrics, the dashboard",
    "operate": "read, plus push, deploy, halt, labels and device configuration",
    "admin": "everything: also tokens and device enrollment",
}


def scope_allows(held: str, needed: Scope) -> bool:
    """Whether a token with scope `held` may do what needs `needed` (an unknown scope allows nothing)."""
    return held in SCOPES and SCOPES.index(held) >= SCOPES.index(needed)  # type: ignore[arg-type]
