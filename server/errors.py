"""One error shape for every failure: ``{"error": {"code": "...", "message": "..."}}`` with the right status.

Routes raise ``ApiError``; FastAPI's own validation errors, routing 404/405 and anything unexpected
(500, logged with its trace) are turned into the same shape by the handlers installed here.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from capguard.server.schemas import ErrorResponse

log = logging.getLogger(__name__)

# capguard.models.video error codes (and the decode pool's own) -> HTTP status
VIDEO_ERROR_STATUS = {
    "video_too_large": 413,
    "resolution_too_large": 413,
    "duration_too_long": 413,
    "not_a_video": 415,
    "corrupt_video": 422,
    "decode_failed": 422,     # the decoder raised something that is not a VideoError
    "decoder_crashed": 422,   # the decoder process died on this file (segfault, abort)
    "decode_timeout": 504,
    "decoder_unavailable": 503,  # the worker processes cannot start
}

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


class ApiError(Exception):
    """An error answer: status, a stable machine-readable code and a message that says what to do."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def video_error(code: str, message: str) -> ApiError:
    """ApiError for a decode failure code, e.g. video_error("not_a_video", "...") -> 415."""
    status = VIDEO_ERROR_STATUS.get(code, 422)
    return ApiError(status, code, message, {"Retry-After": "5"} if status == 503 else None)


def unavailable(code: str, message: str, retry_after_s: int = 1) -> ApiError:
    """503 with Retry-After, for overload and not-ready answers."""
    return ApiError(503, code, message, {"Retry-After": str(retry_after_s)})


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status,
                        headers=headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = [{"loc": [str(p) for p in err.get("loc", ())], "msg": err.get("msg", "")} for err in exc.errors()]
    summary = "; ".join(f"{'.'.join(d['loc'][1:] or d['loc'])}: {d['msg']}" for d in details)
    return error_response(422, "invalid_request", f"invalid request: {summary}", details=details)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return error_response(exc.status_code, code, message, getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "the server failed on this request; the log has the details")


ERROR_REF = "#/components/schemas/ErrorResponse"


def _error_doc(status: int) -> dict[str, Any]:
    """An OpenAPI response in the one error shape. Example: 400 -> {"description": "Bad Request", ...}."""
    return {"description": HTTPStatus(status).phrase,
            "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}}


def _document_error_shape(app: FastAPI) -> None:
    """Make the OpenAPI schema say what the handlers above answer, for every route (present and future).

    FastAPI documents its validation errors as ``HTTPValidationError`` ({"detail": [...]}) and leaves out
    the 400 it raises for a body it cannot parse; here both answer ``ErrorResponse``. So every 422 points
    at ErrorResponse, and every operation with a request body lists 400 and 422 (schemathesis found both).
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if "requestBody" in operation:   # a body that does not parse (400) or validate (422)
                    for status in (400, 422):
                        responses.setdefault(str(status), _error_doc(status))
                for response in responses.values():
                    media = response.get("content", {}).get("application/json", {})
                    if media.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                        media["schema"] = {"$ref": ERROR_REF}
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(error_schema.pop("$defs", {}))
        components.setdefault("ErrorResponse", error_schema)
        paths = json.dumps(schema["paths"])
        for unused in ("HTTPValidationError", "ValidationError"):
            if f"/{unused}\"" not in paths:
                components.pop(unused, None)
        return schema

    app.openapi = openapi


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    _document_error_shape(app)
