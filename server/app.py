"""The app factory: ``create_app(settings)`` wires settings, metrics, routes and the lifespan.

    app = create_app(Settings(checkpoints_root="checkpoints", default_checkpoint="demo"))
    uvicorn.run(app)                  # or: capguard serve

Everything heavy is built by ``init_state`` (server/state.py), once per app in ``lifespan``: the caption
log, the guards, the decoder processes, the model thread, the evaluation jobs and the default checkpoint
(so a test's TestClient gets its own of each).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from capguard.server.errors import install_error_handlers
from capguard.server.metrics import Metrics
from capguard.server.routes import (
    caption_router,
    checkpoints_router,
    evaluations_router,
    health_router,
    metrics_router,
    ui_router,
)
from capguard.server.settings import Settings
from capguard.server.state import init_state


class RequestMetrics:
    """ASGI middleware: capguard_requests_total{endpoint,status} and request durations, by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500   # an exception escaping the app ends as a 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")   # set by the router on a match; unmatched paths share one label
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build the state (server/state.py), start it, serve, close it."""
    state = init_state(app.state.settings, app.state.metrics)
    app.state.capguard = state
    try:
        await state.start()
        yield
    finally:
        await state.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="capguard", summary="Video captions with mode-collapse guardrails", version="0.1.0",
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics = Metrics()   # a fresh registry per app
    install_error_handlers(app)
    app.add_middleware(RequestMetrics, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    for router in (caption_router, checkpoints_router, evaluations_router, health_router, metrics_router):
        app.include_router(router)
    app.include_router(ui_router)
    return app
