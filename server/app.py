"""The app factory: ``create_app(settings)`` wires settings, metrics, routes and the lifespan.

    app = create_app(Settings(checkpoints_root="checkpoints", default_checkpoint="demo"))
    uvicorn.run(app)                  # or: capguard serve

Everything heavy starts in ``lifespan``, once per app: the caption log, the guards, the decoder
processes, the model thread and the default checkpoint (so a test's TestClient gets its own of each).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from capguard.models.video import VideoLimits
from capguard.server.batcher import Batcher
from capguard.server.decode import DecodePool, import_function
from capguard.server.deps import AppState, Checkpoints
from capguard.server.errors import ApiError, install_error_handlers
from capguard.server.evaluations import EvaluationManager, JobStore
from capguard.server.guard import GuardRegistry, GuardSettings
from capguard.server.metrics import Metrics
from capguard.server.routes import (
    caption_router,
    checkpoints_router,
    evaluations_router,
    health_router,
    metrics_router,
    ui_router,
)
from capguard.server.routes.caption import run_batch
from capguard.server.settings import Settings
from capguard.server.storage import CaptionLog

log = logging.getLogger(__name__)

STALE_UPLOAD_S = 3600   # temp uploads older than this were left by a killed process, whoever wrote them


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


def _owner_gone(path: Path) -> bool:
    """Whether the server process named in an upload's name (upload-<pid>-*.video) no longer runs.

    Our own pid counts as gone: at startup we have no uploads, so such a file is a killed predecessor's
    (a container's server is pid 1 on every start). Example: "upload-4242-x.video" -> True once 4242 is gone.
    """
    pid = path.name.split("-")[1]
    if not pid.isdigit():
        return False   # no owner in the name: only the age rule applies
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:   # alive, another user's
        pass
    return False


def _remove_stale_uploads(tmp_dir: Path) -> None:
    """Remove the uploads a killed server left: its pid is gone (or is ours), or the file is an hour old.

    Uploads of another live server sharing this data dir are kept (same pid namespace assumed).
    """
    cutoff = time.time() - STALE_UPLOAD_S
    for path in tmp_dir.glob("upload-*"):
        try:
            if _owner_gone(path) or path.stat().st_mtime < cutoff:
                path.unlink()
                log.info("removed %s, an upload left by a server that was killed", path.name)
        except OSError:
            pass


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    import_function(settings.decoder)   # a typo in the decoder setting fails here, not in every worker
    data_dir = Path(settings.data_dir)
    (data_dir / "tmp").mkdir(parents=True, exist_ok=True)
    _remove_stale_uploads(data_dir / "tmp")
    storage = CaptionLog(data_dir / "capguard.db")
    guards = GuardRegistry(GuardSettings.from_options(settings.guard_options()))

    def restore_guard(name: str, stack) -> None:
        """On each checkpoint load: refill its guard window from the caption log of the same weights."""
        explicit = {k.removeprefix("guard_") for k in settings.model_fields_set if k.startswith("guard_")}
        guard = guards.configure(name, {k: v for k, v in stack.config.guard.items() if k not in explicit})
        rows = storage.recent(name, settings.guard_window, fingerprint=stack.fingerprint)
        guard.restore(rows)
        metrics.checkpoint_loaded(name)
        metrics.observe_guard(name, guard.state(), count_trips=False)
        log.info("checkpoint %s: guard restored from %d logged captions", name, len(rows))

    checkpoints = Checkpoints(settings.checkpoints_root, settings.default_checkpoint, settings.device,
                              on_load=restore_guard, compile=settings.compile)
    decoder = DecodePool(settings.decode_workers, settings.decoder, settings.decode_timeout_s,
                         max_pending=settings.queue_size,
                         on_restart=lambda reason: metrics.decoder_restarts.labels(reason).inc())
    # the lambdas read `state` when the model thread calls them, by which time it exists
    batcher = Batcher(lambda jobs: run_batch(state, jobs), settings.max_batch_size, settings.max_wait_ms / 1000,
                      settings.queue_size, on_batch=metrics.batch_size.observe,
                      expect_more=lambda: state.preparing > 0, workers=settings.model_threads)
    state = AppState(settings=settings, metrics=metrics, storage=storage, guards=guards, checkpoints=checkpoints,
                     decoder=decoder, batcher=batcher,
                     limits=VideoLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels,
                                        max_duration_s=settings.max_duration_s, max_frames=settings.max_frames))
    metrics.track_queue(batcher.depth)
    # evaluation jobs: one at a time, each in its own process (server/evaluations.py)
    evaluations = EvaluationManager(JobStore(data_dir / "evaluations.db"), data_dir / "evaluations",
                                    settings.evaluation_timeout_s, settings.evaluation_keep,
                                    on_change=metrics.observe_evaluation_jobs,
                                    on_report=metrics.observe_evaluation_report)
    try:
        await asyncio.to_thread(decoder.start)
        state.batcher.start()
        app.state.capguard = state
        app.state.evaluations = evaluations
        evaluations.start()
        try:
            await checkpoints.get(settings.default_checkpoint)
        except ApiError as exc:
            log.error("default checkpoint %r is not available (%s); /readyz answers 503 until one is activated",
                      settings.default_checkpoint, exc.message)
        yield
    finally:
        await asyncio.to_thread(evaluations.stop)
        evaluations.store.close()
        state.batcher.stop()
        decoder.close()
        checkpoints.close()
        storage.close()


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
