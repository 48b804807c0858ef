"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from capguard.models.engines import EngineError
from capguard.server.deps import State
from capguard.server.errors import unavailable
from capguard.server.schemas import Health, Ready, error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive and its event loop answers."""
    return Health(status="alive")


@router.get("/readyz", response_model=Ready, responses=error_responses(503))
async def readyz(state: State) -> Ready:
    """200 once the active checkpoint is loaded and the model thread and decoders run; 503 otherwise."""
    name = state.checkpoints.active
    stack = state.checkpoints.loaded(name)
    if stack is None:
        raise unavailable("not_ready", f"checkpoint {name!r} is not loaded (see the server log)", 5)
    if not state.batcher.alive() or not state.decoder.alive():
        raise unavailable("not_ready", "the model thread or the decoder processes are not running", 5)
    if stack.engine is not None:
        try:
            stack.engine.check_health()
        except EngineError as exc:
            state.checkpoints.drop_dead_engines()   # the next request (or activate) reloads it with a new engine
            raise unavailable("engine_unavailable", f"the {stack.engine.name} engine cannot serve: {exc}", 5) from None
    return Ready(status="ready", checkpoint=name, fingerprint=stack.fingerprint)
