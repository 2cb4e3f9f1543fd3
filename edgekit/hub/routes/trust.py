"""`/api/trust`: the hub's trust root (which keys devices trust) and its rotation (admin tokens only).

A rotation issues the next root, signed by the hub key it replaces and by the new one; the hub announces it to
every device on `config/trust` and signs every current desired state again (`Hub.rotate_keys`)."""

from collections.abc import Callable

from fastapi import APIRouter
from pydantic import Field, field_validator

from edgekit.hub.auth import Actor, Admin, audit
from edgekit.hub.deps import Sessions
from edgekit.hub.routes import unprocessable
from edgekit.schema import StrictModel
from edgekit.signing import key_id
from edgekit.trust import TrustRoot, public_key

Rotate = Callable[[bool, list[str] | None], TrustRoot]


class TrustOut(StrictModel):
    version: int
    issued: float
    hub_keys: list[str] = Field(description="Key ids of the hub keys that sign desired states")
    bundle_keys: list[str] = Field(description="Key ids of the keys bundles may be signed with")
    hub_key_pem: str = Field(description="The current hub key, for `edgekit agent --hub-key`")


class RotateIn(StrictModel):
    hub_key: bool = Field(False, description="Replace the hub's signing key with a new one")
    bundle_keys: list[str] | None = Field(
        None, max_length=8, description="PEM public keys bundles may be signed with from now on (replacing the "
        "current ones; [] trusts none); unset: unchanged"
    )  # fmt: skip

    @field_validator("bundle_keys")
    @classmethod
    def _ed25519(cls, keys: list[str] | None) -> list[str] | None:
        for pem in keys or []:
            public_key(pem)
        return keys


def describe(root: TrustRoot) -> TrustOut:
    return TrustOut(version=root.version, issued=root.issued, hub_key_pem=root.hub_keys[0],
                    hub_keys=[key_id(k) for k in root.hub_public_keys()],
                    bundle_keys=[key_id(k) for k in root.bundle_public_keys()])  # fmt: skip


def router_for(current: Callable[[], TrustRoot], rotate: Rotate) -> APIRouter:
    """The routes over the hub's trust (`Hub.trust.root`, `Hub.rotate_keys`)."""
    router = APIRouter()

    @router.get("/trust", response_model=TrustOut)
    def get_trust(actor: Actor) -> TrustOut:
        return describe(current())

    @router.post("/trust/rotate", response_model=TrustOut)
    def post_rotate(body: RotateIn, actor: Admin, sessions: Sessions) -> TrustOut:
        if not body.hub_key and body.bundle_keys is None:
            raise unprocessable(["body"], "nothing to rotate: set hub_key, bundle_keys, or both")
        root = rotate(body.hub_key, body.bundle_keys)
        out = describe(root)
        audit(sessions, actor, "trust.rotate", version=root.version, hub_keys=out.hub_keys,
              bundle_keys=out.bundle_keys)  # fmt: skip
        return out

    return router
