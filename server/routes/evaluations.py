"""Evaluation jobs over HTTP: POST /evaluations (admin, 202), GET /evaluations[/{id}[/report.html]], cancel.

The work itself is server/evaluations/ (a process per job, one at a time). Here: validating what a
request names before anything is queued. Checkpoints go through the same check as /caption's
(``Checkpoints.path``: 404 unknown_checkpoint); the data set is a path relative to ``datasets_root`` that
must stay inside it, symlinks followed (``dataset_path``), and so must every video its manifest lists.
Ids are checked against capguard.server.evaluations.JOB_ID before they are used anywhere.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from capguard.models.captions_file import CaptionsFile, CaptionsFileError, parse_captions, read_captions_file
from capguard.models.evaluate import load_dataset
from capguard.models.report import CSP as REPORT_CSP
from capguard.server.deps import Admin, State
from capguard.server.errors import ApiError, unavailable
from capguard.server.evaluations import EvaluationManager, Job, JobSpec, valid_job_id
from capguard.server.routes.upload import FORM_OVERHEAD
from capguard.server.schemas import (
    MAX_NUM_FRAMES,
    CaptionsEvaluationRequest,
    EvaluationJob,
    EvaluationLinks,
    EvaluationList,
    EvaluationProgress,
    EvaluationRequest,
    error_responses,
)

router = APIRouter(tags=["evaluations"])

# The report's own policy (no script, nothing from elsewhere), and no framing by other sites.
REPORT_HEADERS = {"Content-Security-Policy": f"{REPORT_CSP}; base-uri 'none'; form-action 'none'; "
                                             "frame-ancestors 'none'",
                  "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def get_manager(state: State) -> EvaluationManager:
    return state.evaluations


Manager = Annotated[EvaluationManager, Depends(get_manager)]


def dataset_path(root: Path, name: str) -> Path:
    """The data set `name` (relative to root) as an absolute path inside root; ApiError otherwise.

    422 dataset_outside_root for an absolute name, a ".." part or a symlink that resolves out of root
    (checked before existence, so the answer says nothing about files outside); 404 unknown_dataset when
    nothing is there. Example: root=/srv/data, "val/val.jsonl" -> /srv/data/val/val.jsonl;
    "../etc/passwd", "/etc/passwd", "C:\\x" -> 422.
    """
    pure = PurePosixPath(name)
    if ("\0" in name or pure.is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive
            or ".." in pure.parts or ".." in PureWindowsPath(name).parts):
        raise _outside(name)
    root = root.resolve()
    path = (root / pure).resolve()
    if not path.is_relative_to(root):
        raise _outside(name)
    if not path.exists():
        raise ApiError(404, "unknown_dataset", f"no data set {name!r} under the datasets root; name a JSONL "
                                               "manifest or a directory of videos relative to it")
    return path


def _outside(name: str) -> ApiError:
    return ApiError(422, "dataset_outside_root", f"data set {name!r} is not inside the datasets root; give a "
                                                 "path relative to it without '..' (CAPGUARD_DATASETS_ROOT)")


def _time(seconds: float | None) -> dt.datetime | None:
    return None if seconds is None else dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def describe(job: Job, report: dict | None = None) -> EvaluationJob:
    base = f"/evaluations/{job.id}"
    spec = job.spec
    return EvaluationJob(
        id=job.id, status=job.status, checkpoints=spec.names, dataset=spec.dataset, limit=spec.limit,
        num_frames=spec.num_frames, references=spec.references, max_new_tokens=spec.max_new_tokens,
        decoding=spec.decoding,
        progress=EvaluationProgress(done=job.done, total=job.total), error=job.error, attempts=job.attempts,
        created_at=_time(job.created_at), started_at=_time(job.started_at), finished_at=_time(job.finished_at),
        links=EvaluationLinks(self=base, report_html=f"{base}/report.html", cancel=f"{base}/cancel"),
        report=report)


def _job(manager: Manager, job_id: str) -> Job:
    job = manager.store.get(job_id) if valid_job_id(job_id) else None
    if job is None:
        raise ApiError(404, "unknown_evaluation", f"no evaluation {job_id[:64]!r}; GET /evaluations lists them")
    return job


def _request_body_doc() -> dict:
    """OpenAPI for POST /evaluations: JSON (checkpoints on a data set, or named caption files) or multipart
    (uploaded caption files). The route reads the body itself, so FastAPI cannot infer this."""
    def schema(model) -> dict:
        out = model.model_json_schema()
        out.pop("$defs", None)
        return out

    upload = {"type": "object", "required": ["captions"], "properties": {
        "captions": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1},
        "num_frames": {"type": "integer", "minimum": 1, "maximum": MAX_NUM_FRAMES}}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"anyOf": [schema(EvaluationRequest), schema(CaptionsEvaluationRequest)]}},
        "multipart/form-data": {"schema": upload}}}}


@router.post("/evaluations", status_code=202, response_model=EvaluationJob, dependencies=[Admin],
             responses=error_responses(400, 401, 404, 411, 413, 415, 422, 503), openapi_extra=_request_body_doc())
async def create(request: Request, state: State, manager: Manager, response: Response) -> EvaluationJob:
    """Queue an evaluation; poll the answer's links.self for progress. JSON ``{"checkpoints", "dataset"}``
    evaluates checkpoints on a data set; JSON ``{"captions": [...]}`` names caption files under the datasets
    root, and multipart ``captions`` file fields upload them (one report row per file, see
    capguard.models.evaluate.captions)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        job = await _create_from_upload(request, state, manager)
    elif content_type in ("application/json", ""):
        try:
            payload = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "bad_request", "the body is not JSON; send application/json (or multipart "
                                               "caption files)") from None
        if isinstance(payload, dict) and "captions" in payload:
            body = _validated(CaptionsEvaluationRequest, payload)
            job = await run_in_threadpool(_create_from_paths, body, state, manager)
        else:
            job = await run_in_threadpool(_create_for_checkpoints, _validated(EvaluationRequest, payload), state,
                                          manager)
    else:
        raise ApiError(415, "unsupported_media_type", "send application/json, or multipart/form-data with "
                                                      "'captions' file fields")
    response.headers["Location"] = f"/evaluations/{job.id}"
    return describe(job)


def _validated(model, payload):
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]) from None


def _check_queue(state, manager: EvaluationManager) -> None:
    size = state.settings.evaluation_queue_size
    if manager.store.active() >= size:
        raise unavailable("evaluation_queue_full", f"{size} evaluations are already queued or running; retry "
                                                   "when one has finished", 60)


def _captions_spec(state, root: Path, description: str, entries: list, num_frames: int | None) -> JobSpec:
    settings = state.settings
    return JobSpec(checkpoints=[], dataset=description, datasets_root=str(root), num_frames=num_frames,
                   device=settings.device, decoder=settings.decoder, limits=dataclasses.asdict(state.limits),
                   threads=settings.evaluation_threads, nice=settings.evaluation_nice, captions=entries)


def _check_captions(files: list[CaptionsFile], state) -> None:
    settings = state.settings
    if len(files) > settings.evaluation_max_checkpoints:
        raise ApiError(422, "too_many_checkpoints", f"{len(files)} caption files; a job takes at most "
                                                    f"{settings.evaluation_max_checkpoints}: split it")
    for f in files:
        if len(f.rows) > settings.evaluation_max_videos:
            raise ApiError(422, "too_many_videos", f"{f.source}: {len(f.rows)} videos; a job takes at most "
                                                   f"{settings.evaluation_max_videos} per file")


def _captions_error(exc: CaptionsFileError, upload: bool) -> ApiError:
    status = 413 if upload and exc.code == "too_large" else 422
    return ApiError(status, "bad_captions" if status == 422 else "captions_too_large", str(exc))


def _create_from_paths(body: CaptionsEvaluationRequest, state, manager: EvaluationManager) -> Job:
    """Caption files named under the datasets root: each read and checked here (422 naming file and line)."""
    root = Path(state.settings.datasets_root).resolve()
    videos = dataset_path(root, body.videos) if body.videos else None
    if videos is not None and not videos.is_dir():
        raise ApiError(422, "bad_captions", f"videos {body.videos!r} is not a directory under the datasets root")
    files, entries = [], []
    for name in body.captions:
        path = dataset_path(root, name)
        try:
            loaded = read_captions_file(path, videos_root=videos, max_bytes=state.settings.evaluation_max_captions_bytes)
        except CaptionsFileError as exc:
            raise ApiError(422, "bad_captions", str(exc).replace(str(path), name)) from None
        if any(r.video_path is not None and not r.video_path.resolve().is_relative_to(root) for r in loaded.rows):
            raise ApiError(422, "dataset_outside_root", f"caption file {name!r} names videos outside the datasets "
                                                        "root; keep video_path relative and inside it")
        files.append(loaded)
        entries.append([loaded.name, PurePosixPath(name).as_posix(),
                        str(videos.relative_to(root)) if videos else str(path.parent.relative_to(root)), name])
    _check_captions(files, state)
    _check_queue(state, manager)
    spec = _captions_spec(state, root, ", ".join(body.captions), entries, body.num_frames)
    return manager.submit(spec, total=sum(len(f.rows) for f in files))


async def _create_from_upload(request: Request, state, manager: EvaluationManager) -> Job:
    """Uploaded caption files (multipart ``captions``): size-checked, parsed and checked before queueing;
    stored in the job's directory under names of our own (the client's filename only names the row)."""
    limit = state.settings.evaluation_max_captions_bytes
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():   # a chunked body would be spooled before its size is known
        raise ApiError(411, "length_required", "send caption file uploads with a Content-Length header")
    if int(declared) > limit + FORM_OVERHEAD:
        raise ApiError(413, "captions_too_large", f"the upload is larger than {limit:,} bytes; split the caption "
                                                  "files over several jobs, or name them under the datasets root")
    max_files = state.settings.evaluation_max_checkpoints
    try:
        form = await request.form(max_files=max_files + 1, max_fields=8)
    except StarletteHTTPException as exc:
        raise ApiError(400, "bad_multipart", f"cannot read the multipart body: {exc.detail}") from None
    try:
        unknown = sorted(set(form.keys()) - {"captions", "num_frames"})
        if unknown:
            raise ApiError(422, "invalid_request", f"unknown form fields {unknown}; send 'captions' files "
                                                   "(and optionally num_frames)")
        uploads = [u for u in form.getlist("captions") if isinstance(u, StarletteUploadFile)]
        if not uploads:
            raise ApiError(422, "invalid_request", "no 'captions' file field; upload one JSONL file per "
                                                   "checkpoint or epoch (curl -F captions=@epoch-1.jsonl)")
        num_frames = _validated(CaptionsEvaluationRequest, {"captions": ["upload"],
                                                            "num_frames": form.get("num_frames") or None}).num_frames
        files, contents, total_bytes = [], {}, 0
        for i, upload in enumerate(uploads, 1):
            data = await upload.read(limit + 1)
            total_bytes += len(data)
            if total_bytes > limit:
                raise ApiError(413, "captions_too_large", f"the caption files are larger than {limit:,} bytes")
            source = _display_name(upload.filename, i)
            try:
                files.append(parse_captions(data, source=source, name=PurePosixPath(source).stem, max_bytes=limit))
            except CaptionsFileError as exc:
                raise _captions_error(exc, upload=True) from None
            contents[f"inputs/{i}.jsonl"] = data
    finally:
        await form.close()
    names = [f.name for f in files]
    entries = [[f.name if names.count(f.name) == 1 else f"{f.name}#{i}", f"inputs/{i}.jsonl", None, f.source]
               for i, f in enumerate(files, 1)]
    _check_captions(files, state)
    _check_queue(state, manager)
    root = Path(state.settings.datasets_root).resolve()
    spec = _captions_spec(state, root, "uploaded: " + ", ".join(f.source for f in files), entries, num_frames)
    return await run_in_threadpool(manager.submit, spec, sum(len(f.rows) for f in files), contents)


def _display_name(filename: str | None, index: int) -> str:
    """A client's filename as a row label only: its last part, safe characters, 64 at most.
    Example: "../../runs/epoch 3.jsonl" -> "epoch_3.jsonl"; None -> "upload-2.jsonl"."""
    base = PureWindowsPath(PurePosixPath(filename or "").name).name
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in base).strip("._")[:64]
    return cleaned or f"upload-{index}.jsonl"


def _create_for_checkpoints(body: EvaluationRequest, state, manager: EvaluationManager) -> Job:
    """Checkpoints on a data set under the datasets root."""
    settings = state.settings
    if len(body.checkpoints) > settings.evaluation_max_checkpoints:
        raise ApiError(422, "too_many_checkpoints", f"{len(body.checkpoints)} checkpoints; a job takes at most "
                                                    f"{settings.evaluation_max_checkpoints}: split it")
    if len(set(body.checkpoints)) != len(body.checkpoints):
        raise ApiError(422, "duplicate_checkpoint", "a checkpoint is named twice; name each once")
    checkpoints = [[name, str(state.checkpoints.path(name))] for name in body.checkpoints]   # 404s
    root = Path(settings.datasets_root).resolve()
    path = dataset_path(root, body.dataset)
    try:
        dataset = load_dataset(path, body.references, body.limit)
    except (ValueError, OSError) as exc:
        message = str(exc).replace(str(path), body.dataset)
        raise ApiError(422, "bad_dataset", f"data set {body.dataset!r} cannot be used: {message}") from None
    if any(not item.path.resolve().is_relative_to(root) for item in dataset.items):
        raise ApiError(422, "dataset_outside_root", f"data set {body.dataset!r} lists videos outside the "
                                                    "datasets root; keep its paths relative and inside it")
    if len(dataset.items) > settings.evaluation_max_videos:
        raise ApiError(422, "too_many_videos", f"{len(dataset.items)} videos; a job takes at most "
                                               f"{settings.evaluation_max_videos}: pass a smaller limit")
    _check_queue(state, manager)
    spec = JobSpec(checkpoints=checkpoints, dataset=PurePosixPath(body.dataset).as_posix(),
                   datasets_root=str(root), references=body.references, limit=body.limit,
                   num_frames=body.num_frames, max_new_tokens=body.max_new_tokens,
                   decoding=body.decoding().given(), device=settings.device, decoder=settings.decoder,
                   limits=dataclasses.asdict(state.limits), threads=settings.evaluation_threads,
                   nice=settings.evaluation_nice)
    return manager.submit(spec, total=len(checkpoints) * len(dataset.items))


@router.get("/evaluations", response_model=EvaluationList)
def list_evaluations(manager: Manager) -> EvaluationList:
    """Every kept job, newest first, with status and progress (reports: GET /evaluations/{id})."""
    return EvaluationList(evaluations=[describe(job) for job in manager.store.list()])


@router.get("/evaluations/{job_id}", response_model=EvaluationJob, responses=error_responses(404))
def get_evaluation(job_id: str, manager: Manager) -> EvaluationJob:
    """Status, progress and times; the report JSON once the job is over (partial when it failed)."""
    job = _job(manager, job_id)
    return describe(job, manager.report(job.id) if job.finished else None)


@router.get("/evaluations/{job_id}/report.html", response_class=FileResponse, responses=error_responses(404))
def report_html(job_id: str, manager: Manager) -> FileResponse:
    """The report page (capguard.models.report); written after each checkpoint, so it exists while a job runs."""
    job = _job(manager, job_id)
    path = manager.report_html(job.id)
    if path is None:
        raise ApiError(404, "report_not_ready", f"evaluation {job.id} has no report yet ({job.status}); it is "
                                                "written when its first checkpoint is finished")
    return FileResponse(path, media_type="text/html; charset=utf-8", headers=REPORT_HEADERS)


@router.post("/evaluations/{job_id}/cancel", response_model=EvaluationJob, dependencies=[Admin],
             responses=error_responses(401, 404, 409))
def cancel(job_id: str, manager: Manager) -> EvaluationJob:
    """Cancel a queued or running job (a running one answers 'running' until its process has stopped)."""
    job = _job(manager, job_id)
    if job.finished:
        raise ApiError(409, "evaluation_finished", f"evaluation {job.id} is already {job.status}")
    return describe(manager.cancel(job.id) or job)
