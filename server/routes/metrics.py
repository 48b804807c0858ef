"""Prometheus exposition of the app's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Response

from capguard.server.deps import MetricsAccess, State
from capguard.server.schemas import error_responses

router = APIRouter(tags=["metrics"])


@router.get("/metrics", dependencies=[MetricsAccess], response_class=Response,
            responses={200: {"description": "Prometheus text exposition",
                             "content": {"text/plain": {"schema": {"type": "string"}}}},
                       **error_responses(401)})
async def metrics(state: State) -> Response:
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)
