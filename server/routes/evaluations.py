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
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi.responses import FileResponse

from capguard.models.evaluate import load_dataset
from capguard.models.report import CSP as REPORT_CSP
from capguard.server.deps import Admin, State
from capguard.server.errors import ApiError, unavailable
from capguard.server.evaluations import EvaluationManager, Job, JobSpec, valid_job_id
from capguard.server.schemas import (
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


@router.post("/evaluations", status_code=202, response_model=EvaluationJob, dependencies=[Admin],
             responses=error_responses(401, 404, 422, 503))
def create(body: EvaluationRequest, state: State, manager: Manager, response: Response) -> EvaluationJob:
    """Queue an evaluation of `checkpoints` on `dataset`; poll the answer's links.self for progress."""
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
    if manager.store.active() >= settings.evaluation_queue_size:
        raise unavailable("evaluation_queue_full", f"{settings.evaluation_queue_size} evaluations are already "
                                                   "queued or running; retry when one has finished", 60)
    spec = JobSpec(checkpoints=checkpoints, dataset=PurePosixPath(body.dataset).as_posix(),
                   datasets_root=str(root), references=body.references, limit=body.limit,
                   num_frames=body.num_frames, max_new_tokens=body.max_new_tokens,
                   decoding=body.decoding().given(), device=settings.device, decoder=settings.decoder,
                   limits=dataclasses.asdict(state.limits), threads=settings.evaluation_threads,
                   nice=settings.evaluation_nice)
    job = manager.submit(spec, total=len(checkpoints) * len(dataset.items))
    response.headers["Location"] = f"/evaluations/{job.id}"
    return describe(job)


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
