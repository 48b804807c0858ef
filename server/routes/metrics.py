"""Prometheus exposition of the app's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.deps import MetricsAccess, State

router = APIRouter(tags=["metrics"])


@router.get("/metrics", dependencies=[MetricsAccess], response_class=Response)
async def metrics(state: State) -> Response:
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)
