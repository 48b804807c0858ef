"""The multipart body of POST /caption, streamed to a temporary file as it arrives.

Starlette's own form parsing would buffer the whole upload before the route runs and knows no
size limit for files, so /caption reads ``request.stream()`` itself with python-multipart's
streaming parser: the ``video`` part goes straight to ``<data_dir>/tmp/upload-<pid>-*.video`` (a
name of our own; the client's filename is never used), hashed with sha256 on the way, and the size
limit answers 413 as soon as it is crossed. Text fields are small and kept in memory.

    upload = await receive_upload(request, tmp_dir, max_bytes=256 * 2**20)
    try: ...use upload.path, upload.sha256, upload.fields["num_frames"]...
    finally: upload.remove()
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from capguard.server.errors import ApiError, unavailable

log = logging.getLogger(__name__)

FILE_FIELD = "video"
MAX_FIELD_BYTES = 1024      # checkpoint names and numbers; anything longer is a mistake
MAX_FIELDS = 16
FORM_OVERHEAD = 64 * 1024   # part headers and text fields on top of the file itself


@dataclass
class Upload:
    path: Path                  # our temporary file; remove() it when done
    sha256: str                 # hex digest of the file part's bytes
    size: int                   # bytes
    fields: dict[str, str] = field(default_factory=dict)   # the text fields, decoded as UTF-8

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _invalid(field_name: str, message: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": ("body", field_name), "msg": message, "input": None}])


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "video_too_large", f"the upload is larger than the limit of {max_bytes:,} bytes "
                                            f"({max_bytes / 2**20:.1f} MiB); upload a shorter or more compressed video")


# out of file descriptors, disk space or memory: the server's trouble, not the request's; it passes
RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EDQUOT, errno.ENOMEM}


def _out_of_resources(exc: OSError) -> ApiError:
    """503 + Retry-After for an OSError whose errno is in RESOURCE_ERRNOS.

    Example: OSError(errno.EMFILE, "Too many open files") -> ApiError 503 "insufficient_resources".
    """
    log.error("cannot store an upload: %s", exc)
    return unavailable("insufficient_resources", f"the server cannot store the upload right now "
                                                 f"({exc.strerror}); retry shortly", 5)


class _Receiver:
    """python-multipart callbacks: route each part's bytes to the temp file or to a text field."""

    def __init__(self, out, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.hasher = hashlib.sha256()
        self.size = 0
        self.fields: dict[str, str] = {}
        self.got_file = self.ended = False
        self._header_field, self._header_value = bytearray(), bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._value = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field_data,
                "on_header_value": self._header_value_data, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_end": self._end}

    def _part_begin(self) -> None:
        self._headers.clear()
        self._name, self._value = None, bytearray()

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition"))
        name = params.get(b"name")
        if disposition != b"form-data" or name is None:
            raise ApiError(400, "bad_multipart", "a multipart part has no Content-Disposition: form-data name")
        self._name = name.decode("utf-8", "replace")
        if self._name == FILE_FIELD:
            if self.got_file:
                raise _invalid(FILE_FIELD, "send exactly one video file")
            self.got_file = True
        elif self._name in self.fields:
            raise _invalid(self._name, "field given twice")
        elif len(self.fields) >= MAX_FIELDS:
            raise _invalid(self._name, f"more than {MAX_FIELDS} form fields")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._name == FILE_FIELD:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise _too_large(self.max_bytes)
            self.hasher.update(chunk)
            self.out.write(chunk)   # page-cache write of <= one network chunk: cheap enough for the loop
        else:
            self._value += chunk
            if len(self._value) > MAX_FIELD_BYTES:
                raise _invalid(self._name or "?", f"longer than {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._name != FILE_FIELD and self._name is not None:
            try:
                self.fields[self._name] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise _invalid(self._name, "not valid UTF-8") from None

    def _end(self) -> None:
        self.ended = True


async def receive_upload(request: Request, tmp_dir: Path, max_bytes: int) -> Upload:
    """Stream the multipart body to a temp file; raise 413/415/400/422 ApiErrors (the file is then removed)."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "send the video as multipart/form-data with a 'video' "
                                                      "file field (curl -F video=@clip.mp4)")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "the multipart/form-data Content-Type has no boundary")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + FORM_OVERHEAD:
        raise _too_large(max_bytes)

    tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        # the owner's pid in the name: a restarted server removes what a killed one left (capguard.server.app)
        fd, name = tempfile.mkstemp(prefix=f"upload-{os.getpid()}-", suffix=".video", dir=tmp_dir)
    except OSError as exc:
        if exc.errno in RESOURCE_ERRNOS:
            raise _out_of_resources(exc) from exc
        raise
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            receiver = _Receiver(out, max_bytes)
            try:
                parser = MultipartParser(boundary, receiver.callbacks())
            except ValueError as exc:   # FormParserError: e.g. an over-long boundary
                raise ApiError(400, "bad_multipart", f"bad multipart boundary ({exc})") from None
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes + FORM_OVERHEAD:
                    raise _too_large(max_bytes)
                parser.write(chunk)
            parser.finalize()
        if not receiver.ended:
            raise ApiError(400, "bad_multipart", "the multipart body ended before its closing boundary "
                                                 "(an interrupted upload?)")
        if not receiver.got_file:
            raise _invalid(FILE_FIELD, "Field required (a multipart file field named 'video')", "missing")
        return Upload(path, receiver.hasher.hexdigest(), receiver.size, receiver.fields)
    except MultipartParseError as exc:
        path.unlink(missing_ok=True)
        raise ApiError(400, "bad_multipart", f"the multipart body is malformed ({exc})") from None
    except ClientDisconnect:
        path.unlink(missing_ok=True)
        raise ApiError(400, "upload_interrupted", "the client went away before the upload was complete") from None
    except OSError as exc:   # the temp file could not be written (disk full, ...)
        path.unlink(missing_ok=True)
        if exc.errno in RESOURCE_ERRNOS:
            raise _out_of_resources(exc) from exc
        raise
    except BaseException:
        path.unlink(missing_ok=True)
        raise
