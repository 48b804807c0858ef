"""POST /caption: upload -> decoder process -> batched model call -> caption log -> guard -> answer.

The route parses and answers; the work is the captioning service (server/captioning.py): the body
streams to a temp file (routes/upload.py), ``choose_checkpoint`` applies collapse_policy,
``decode_video`` gets frames from a decoder process, and ``submit`` waits for the model thread's batch
(``run_batch``: model, caption log, guard, metrics). The answer leaves only after its caption is committed.
"""

from __future__ import annotations

import time
from dataclasses import replace

from fastapi import APIRouter, Request

from capguard.models.decoding import (
    MAX_NUM_BEAMS,
    MAX_REPETITION_COUNT,
    MAX_REPETITION_PATTERN,
    MAX_SEED,
    MAX_TEMPERATURE,
    effective,
)
from capguard.server.captioning import (
    CaptionJob,
    cancel_on_disconnect,
    choose_checkpoint,
    decode_video,
    submit,
)
from capguard.server.deps import State
from capguard.server.errors import ApiError
from capguard.server.routes.upload import FILE_FIELD, receive_upload
from capguard.server.schemas import (
    MAX_NEW_TOKENS,
    MAX_NUM_FRAMES,
    CaptionOptions,
    CaptionResponse,
    Decoding,
    DegenerateInfo,
    Fallback,
    FramesInfo,
    GuardInfo,
    Scores,
    Timings,
    error_responses,
)

router = APIRouter(tags=["caption"])

UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FILE_FIELD],
    "properties": {
        FILE_FIELD: {"type": "string", "format": "binary", "description": "the video file"},
        "checkpoint": {"type": "string", "description": "checkpoint name (default: the active one)"},
        "num_frames": {"type": "integer", "minimum": 1, "maximum": MAX_NUM_FRAMES},
        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_NEW_TOKENS},
        # decoding (capguard.models.decoding); absent: the checkpoint's defaults
        "do_sample": {"type": "boolean", "description": "sample instead of greedy/beam search"},
        "temperature": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TEMPERATURE,
                        "description": "needs do_sample=true"},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "description": "needs do_sample=true"},
        "top_k": {"type": "integer", "minimum": 0, "description": "needs do_sample=true; 0: no limit"},
        "num_beams": {"type": "integer", "minimum": 1, "maximum": MAX_NUM_BEAMS,
                      "description": "beam search; not with do_sample=true"},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED,
                 "description": "needs do_sample=true; same seed + video + checkpoint -> same caption"},
        "stop_on_repetition": {"type": "boolean", "description": "end the caption once its last tokens repeat "
                                                                 "(finish_reason \"repetition\")"},
        "repetition_min_count": {"type": "integer", "minimum": 2, "maximum": MAX_REPETITION_COUNT,
                                 "description": "needs stop_on_repetition=true; copies in a row (default 2)"},
        "repetition_min_pattern_size": {"type": "integer", "minimum": 1, "maximum": MAX_REPETITION_PATTERN,
                                        "description": "needs stop_on_repetition=true; tokens (default 8)"},
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
            choice = await choose_checkpoint(state, options.checkpoint)
            video = await decode_video(state, str(upload.path), choice.stack, options.num_frames)
        finally:
            upload.remove()   # the frames are in memory now
    finally:
        state.preparing -= 1
    decode_ms = round(video.seconds * 1000, 3)
    name, stack = choice.name, choice.stack
    gen = options.decoding().apply(stack.config.generation)
    problem = stack.engine.refuse(gen) if stack.engine is not None else None   # what this engine cannot decode
    if problem:
        raise ApiError(422, "invalid_request", f"checkpoint {name!r} ({stack.engine_name} engine): {problem}")
    if options.max_new_tokens is not None:
        gen = replace(gen, max_new_tokens=options.max_new_tokens)
    job = CaptionJob(name, stack, video.frames, gen, upload.sha256, decode_ms)
    result = await cancel_on_disconnect(request.receive, submit(state, job))
    out = result.output
    fallback = None if choice.fallback_from is None else Fallback(requested=choice.fallback_from, reason=choice.reason)
    return CaptionResponse(
        caption=out.caption, checkpoint=name, fallback=fallback, decoding=Decoding(**effective(gen)),
        fingerprint=stack.fingerprint, video_sha256=upload.sha256,
        frames=FramesInfo(count=len(video.indices), indices=video.indices, timestamps_s=video.timestamps_s),
        scores=Scores(siglip=out.score), guard=GuardInfo.model_validate(result.guard.to_dict()),
        degenerate=None if result.degenerate is None else DegenerateInfo(**result.degenerate.to_dict()),
        finish_reason=out.finish_reason,
        timings_ms=Timings(decode=decode_ms, total=round((time.perf_counter() - started) * 1000, 3),
                           **{k: result.stages_ms.get(k, 0.0) for k in ("encode", "generate", "score")}))
