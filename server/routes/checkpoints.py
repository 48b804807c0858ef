"""List the servable checkpoints; switch the active one (admin)."""

from __future__ import annotations

from fastapi import APIRouter

from capguard.models.config import CheckpointConfig, CheckpointError
from capguard.server.deps import Admin, State
from capguard.server.errors import ApiError
from capguard.server.schemas import (
    CheckpointInfo,
    CheckpointList,
    GuardHistoryInfo,
    GuardInfo,
    error_responses,
)
from capguard.server.state import AppState

router = APIRouter(tags=["checkpoints"])


def describe(state: AppState, name: str) -> CheckpointInfo:
    checkpoints = state.checkpoints
    stack = checkpoints.loaded(name)
    projector_type, error = (stack.projector_type, None) if stack is not None else (None, None)
    if stack is None:
        try:
            projector_type = CheckpointConfig.load(checkpoints.path(name)).projector.type
        except CheckpointError as exc:
            error = str(exc)
    return CheckpointInfo(
        name=name, fingerprint=stack.fingerprint if stack else None, projector_type=projector_type,
        loaded=stack is not None, active=name == checkpoints.active, default=name == checkpoints.default,
        guard_status=state.guards.get(name).state().status if stack else None, error=error)


@router.get("/checkpoints", response_model=CheckpointList)
def list_checkpoints(state: State) -> CheckpointList:
    """Every directory under checkpoints_root (1-2 levels) that holds a capguard.json."""
    return CheckpointList(checkpoints=[describe(state, name) for name in state.checkpoints.names()])


def _loaded_guard(state: AppState, name: str):
    """The guard of loaded checkpoint `name`; 404 unknown_checkpoint / checkpoint_not_loaded otherwise."""
    state.checkpoints.path(name)   # 404 unknown_checkpoint
    if state.checkpoints.loaded(name) is None:
        raise ApiError(404, "checkpoint_not_loaded", f"checkpoint {name!r} is not loaded, so it has no guard "
                                                     f"yet; it loads on its first caption or on "
                                                     f"POST /checkpoints/{name}/activate")
    return state.guards.get(name)


@router.get("/checkpoints/{name:path}/guard", response_model=GuardInfo, responses=error_responses(404))
def guard(name: str, state: State) -> GuardInfo:
    """The live guard of a loaded checkpoint: GuardState.to_dict() (status, window figures, rules, modes)."""
    return GuardInfo.model_validate(_loaded_guard(state, name).state().to_dict())


@router.get("/checkpoints/{name:path}/guard/history", response_model=GuardHistoryInfo,
            responses=error_responses(404))
def guard_history(name: str, state: State) -> GuardHistoryInfo:
    """The guard's figures over time (a point every `history_every` captions, the last `history_points`) and
    the rule lines: what the page's live chart draws. In memory: a restart starts from the restored window."""
    thresholds = _loaded_guard(state, name).state().thresholds
    return GuardHistoryInfo.model_validate(state.history.get(name, thresholds))


@router.post("/checkpoints/{name:path}/activate", response_model=CheckpointInfo, dependencies=[Admin],
             responses=error_responses(401, 404, 422))
async def activate(name: str, state: State) -> CheckpointInfo:
    """Load `name` if needed and serve it to requests that name no checkpoint."""
    await state.checkpoints.activate(name)
    return describe(state, name)
