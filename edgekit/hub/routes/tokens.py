"""`/api/tokens`: API tokens listed, created (shown once) and revoked; admin tokens only."""

from fastapi import APIRouter, HTTPException
from sqlalchemy.orm import sessionmaker

from edgekit.errors import BadInput
from edgekit.hub.auth import Admin, create_token, list_tokens, revoke_token
from edgekit.hub.deps import Sessions
from edgekit.hub.routes import unprocessable
from edgekit.hub.schemas import TokenCreated, TokenIn, TokenOut

router = APIRouter()


def _token_out(sessions: sessionmaker, name: str) -> TokenOut:
    return next(TokenOut.model_validate(t, from_attributes=True) for t in list_tokens(sessions) if t.name == name)


@router.get("/tokens", response_model=list[TokenOut])
def get_tokens(_admin: Admin, sessions: Sessions) -> list[TokenOut]:
    return [TokenOut.model_validate(t, from_attributes=True) for t in list_tokens(sessions)]


@router.post("/tokens", response_model=TokenCreated, status_code=201, responses={422: {}})
def post_token(body: TokenIn, actor: Admin, sessions: Sessions) -> TokenCreated:
    try:
        token = create_token(sessions, body.name, actor, body.scope)
    except BadInput as error:
        raise unprocessable(["body", "name"], str(error)) from None
    return TokenCreated(**_token_out(sessions, body.name).model_dump(), token=token)


@router.delete("/tokens/{name}", response_model=TokenOut, responses={404: {}})
def delete_token(name: str, actor: Admin, sessions: Sessions) -> TokenOut:
    try:
        revoke_token(sessions, name, actor)
    except BadInput as error:
        raise HTTPException(status_code=404, detail=str(error)) from None
    return _token_out(sessions, name)
