"""POST /caption: upload -> decoder process -> batched model call -> caption log -> guard -> answer.

The route itself only waits: the body streams to a temp file (routes/upload.py), frames come from
a decoder process (server/decode.py), and ``run_batch`` below runs on the model thread for a whole
batch (server/batcher.py): one stack.caption call, one committed write to the caption log, then the
guard and the metrics. The answer leaves only after its caption is committed.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
from fastapi import APIRouter, Request

from capguard.models.stack import CaptionOutput, CaptionStack
from capguard.server.batcher import QueueFull
from capguard.server.decode import DecodeFailed
from capguard.server.deps import AppState, State
from capguard.server.errors import ApiError, unavailable, video_error
from capguard.server.guard import GuardState
from capguard.server.routes.upload import FILE_FIELD, receive_upload
from capguard.server.schemas import (
    MAX_NEW_TOKENS,
    MAX_NUM_FRAMES,
    CaptionOptions,
    CaptionResponse,
    FramesInfo,
    Scores,
    Timings,
    error_responses,
)
from capguard.server.storage import CaptionRecord

log = logging.getLogger(__name__)
router = APIRouter(tags=["caption"])

COLLAPSED_RETRY_AFTER_S = 300   # a rejected collapsed checkpoint stays so until someone activates another


@dataclasses.dataclass
class CaptionJob:
    checkpoint: str              # name: the batch key, the guard and the log row
    stack: CaptionStack          # chosen (and loaded) on the event loop, so the model thread never loads
    frames: np.ndarray           # (T, H, W, 3) uint8 from the decoder process
    max_new_tokens: int          # this request's own limit; a batch mixes limits
    video_sha256: str            # the guard counts distinct videos by it
    decode_ms: float             # kept in the log row's timings


@dataclasses.dataclass
class CaptionResult:
    output: CaptionOutput        # caption, tokens, score, embeddings
    guard: GuardState            # the verdict right after this caption was observed
    stages_ms: dict[str, float]  # encode/generate/score of the whole batch this video was in


def run_batch(state: AppState, jobs: list[CaptionJob]) -> list[CaptionResult]:
    """Caption one batch (same checkpoint) on the model thread; commit to the log; feed the guard."""
    name, stack = jobs[0].checkpoint, jobs[0].stack
    outputs, stages = stack.caption([job.frames for job in jobs],
                                    max_new_tokens=[job.max_new_tokens for job in jobs])
    stages_ms = {stage: round(seconds * 1000, 3) for stage, seconds in stages.items()}
    state.storage.append([
        CaptionRecord(checkpoint=name, fingerprint=stack.fingerprint, video_sha256=job.video_sha256,
                      caption=out.caption, num_tokens=out.num_tokens, siglip=out.score, text_emb=out.text_emb,
                      video_emb=out.video_emb, timings_ms={"decode": job.decode_ms, **stages_ms, "batch": len(jobs)})
        for job, out in zip(jobs, outputs, strict=True)])
    guard = state.guards.get(name)
    states = [_observe(guard, job, out) for job, out in zip(jobs, outputs, strict=True)]

    metrics = state.metrics
    for stage, seconds in stages.items():
        metrics.stage_seconds.labels(stage).observe(seconds)
    for out, guard_state in zip(outputs, states, strict=True):
        metrics.captions.labels(name).inc()
        metrics.tokens.labels(name).inc(out.num_tokens)
        if out.score is not None:
            metrics.siglip.labels(name).observe(out.score)
        metrics.observe_guard(name, guard_state)
    return [CaptionResult(out, guard_state, stages_ms) for out, guard_state in zip(outputs, states, strict=True)]


def _observe(guard, job: CaptionJob, out: CaptionOutput) -> GuardState:
    """guard.observe; a guard that fails (a bug, a changed scorer) is logged and must not fail the caption."""
    try:
        return guard.observe(job.video_sha256, out.caption, out.text_emb, out.video_emb, out.score)
    except Exception:  # noqa: BLE001 - the caption is already committed; answer it with the last verdict
        log.exception("guard of checkpoint %s failed to observe video %s", job.checkpoint, job.video_sha256[:12])
        return dataclasses.replace(guard.state(), newly_tripped=[])   # nothing tripped on this observe


def _collapsed(state: AppState, name: str) -> bool:
    return state.guards.get(name).state().status == "collapsed"


async def choose_checkpoint(state: AppState, requested: str | None) -> tuple[str, CaptionStack]:
    """The checkpoint to serve with, after collapse_policy.

    "flag" serves whatever it is asked. "reject" answers 503 for a collapsed checkpoint. "fallback"
    serves a request that names no checkpoint from the most recently active loaded one that is not
    collapsed (a request that names one gets that one or a 503: it asked for those weights).
    """
    checkpoints = state.checkpoints
    name = requested or checkpoints.active
    try:
        stack = await checkpoints.get(name)
    except ApiError as exc:
        if requested is not None:
            raise
        raise unavailable("not_ready", f"the active checkpoint cannot serve ({exc.message})", 5) from None
    policy = state.settings.collapse_policy
    if policy == "flag" or not _collapsed(state, name):
        return name, stack
    if policy == "fallback" and requested is None:
        for other in reversed(checkpoints.history):
            other_stack = checkpoints.loaded(other)
            if other != name and other_stack is not None and not _collapsed(state, other):
                return other, other_stack
    raise unavailable("checkpoint_collapsed",
                      f"checkpoint {name!r} is flagged collapsed (its recent captions hardly depend on the video); "
                      "activate a healthy checkpoint (POST /checkpoints/{name}/activate)", COLLAPSED_RETRY_AFTER_S)


UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FILE_FIELD],
    "properties": {
        FILE_FIELD: {"type": "string", "format": "binary", "description": "the video file"},
        "checkpoint": {"type": "string", "description": "checkpoint name (default: the active one)"},
        "num_frames": {"type": "integer", "minimum": 1, "maximum": MAX_NUM_FRAMES},
        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_NEW_TOKENS},
    }}}}}}


@router.post("/caption", response_model=CaptionResponse, openapi_extra=UPLOAD_SCHEMA,
             responses=error_responses(400, 404, 413, 415, 422, 503, 504))
async def caption(request: Request, state: State) -> CaptionResponse:
    started = time.perf_counter()
    settings = state.settings
    state.preparing += 1
    try:
        upload = await receive_upload(request, settings.data_dir / "tmp", settings.max_upload_bytes)
        try:
            options = CaptionOptions.from_form(upload.fields)
            if upload.size == 0:
                raise ApiError(400, "empty_upload", "the 'video' file is empty (0 bytes)")
            name, stack = await choose_checkpoint(state, options.checkpoint)
            if state.decoder.full:
                raise unavailable("busy", f"{state.decoder.pending} uploads are already waiting for a decoder")
            try:
                video = await state.decoder.decode(str(upload.path), options.num_frames or stack.config.num_frames,
                                                   state.limits, stack.frame_side)
            except DecodeFailed as exc:
                raise video_error(exc.code, str(exc)) from None
        finally:
            upload.remove()   # the frames are in memory now
    finally:
        state.preparing -= 1
    state.metrics.stage_seconds.labels("decode").observe(video.seconds)
    decode_ms = round(video.seconds * 1000, 3)
    job = CaptionJob(name, stack, video.frames, options.max_new_tokens or stack.config.generation.max_new_tokens,
                     upload.sha256, decode_ms)
    try:
        # one batch = one checkpoint, whatever the frame sizes (stack.caption resizes a batch of mixed
        # sizes video by video: a 4:3 and a 16:9 upload in one batch once failed both with a 500)
        result: CaptionResult = await state.batcher.submit(job, key=name)
    except QueueFull as exc:
        raise unavailable("queue_full", f"the server is at capacity ({exc}); retry shortly") from None
    out = result.output
    return CaptionResponse(
        caption=out.caption, checkpoint=name, fingerprint=stack.fingerprint, video_sha256=upload.sha256,
        frames=FramesInfo(count=len(video.indices), indices=video.indices, timestamps_s=video.timestamps_s),
        scores=Scores(siglip=out.score), guard=result.guard.to_dict(),
        timings_ms=Timings(decode=decode_ms, total=round((time.perf_counter() - started) * 1000, 3),
                           **{k: result.stages_ms.get(k, 0.0) for k in ("encode", "generate", "score")}))
