"""The small FastAPI dependencies that hand the app's state to routes and guard the admin routes.

``AppState`` itself is built in server/state.py (``init_state``); the checkpoint registry is
server/checkpoints.py.

Admin routes (activate a checkpoint, start or cancel an evaluation) need ``Authorization: Bearer
<admin_token>`` when a token is set. Without one they are open only on a loopback bind (127.0.0.1, ::1,
localhost: the developer's own machine); on any other bind (``--host 0.0.0.0``, the Docker image)
they answer 403 admin_token_required, so a server reachable from a network is never open by accident.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from pydantic import SecretStr

from capguard.server.errors import ApiError, unavailable
from capguard.server.state import AppState

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")   # binds that only this machine reaches


def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "capguard", None)
    if state is None:   # an app whose lifespan has not run (a TestClient used without `with`)
        raise unavailable("not_ready", "the server is still starting", 5)
    return state


State = Annotated[AppState, Depends(get_state)]


def _bearer_matches(request: Request, token: SecretStr) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                             token.get_secret_value().encode())


def _check_token(request: Request, token: SecretStr | None, what: str) -> None:
    if token is not None and not _bearer_matches(request, token):
        raise ApiError(401, "unauthorized", f"{what} needs 'Authorization: Bearer <token>' with the configured token",
                       {"WWW-Authenticate": "Bearer"})


def require_admin(request: Request, state: State) -> None:
    settings = state.settings
    if settings.admin_token is None and settings.host not in LOOPBACK_HOSTS:
        raise ApiError(403, "admin_token_required",
                       f"admin actions are disabled: the server listens on {settings.host!r}, not only on this "
                       "machine, and has no admin token; set CAPGUARD_ADMIN_TOKEN and send 'Authorization: "
                       "Bearer <token>' (or bind to 127.0.0.1)")
    _check_token(request, settings.admin_token, "this admin action")


def require_metrics_token(request: Request, state: State) -> None:
    _check_token(request, state.settings.metrics_token, "/metrics")


Admin = Depends(require_admin)
MetricsAccess = Depends(require_metrics_token)
