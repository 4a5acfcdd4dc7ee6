"""Shared dependencies: the agent state and the bearer token check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from pagewire.agent.node import AgentState
from pagewire.control.errors import ApiError


def agent_state(request: Request) -> AgentState:
    state: AgentState = request.app.state.agent
    return state


Agent = Annotated[AgentState, Depends(agent_state)]


def require_token(request: Request) -> None:
    token = agent_state(request).token
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
        raise ApiError(401, "unauthorized", "a valid bearer token is required")
