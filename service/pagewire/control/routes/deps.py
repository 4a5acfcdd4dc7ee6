"""Shared dependencies: the agent state and the bearer token check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from pagewire.agent.node import AgentState
from pagewire.control.httpguard import token_matches


def agent_state(request: Request) -> AgentState:
    state: AgentState = request.app.state.agent
    return state


Agent = Annotated[AgentState, Depends(agent_state)]


def require_token(request: Request) -> None:
    """The request guard has already checked; this keeps each router safe on its own."""
    token = agent_state(request).token
    if token is None:
        return
    header = dict(request.scope["headers"]).get(b"authorization", b"")
    if not token_matches(header, token.encode()):
        raise HTTPException(401, "a valid bearer token is required")  # code "unauthorized"
