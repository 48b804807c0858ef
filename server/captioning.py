"""The captioning service: what happens to a video between the /caption route and its answer.

    choice = await choose_checkpoint(state, requested=None)           # collapse_policy applies here
    video = await decode_video(state, upload_path, choice.stack, num_frames)   # in a decoder process
    gen = decoding.apply(choice.stack.config.generation)            # this request's decoding options
    result = await submit(state, CaptionJob(choice.name, choice.stack, video.frames, gen, sha256, decode_ms))

``submit`` queues the job on the batcher; ``run_batch`` runs on the model thread for a whole batch of
one checkpoint, in steps: ``generate`` (the model: encode, generate, score; each job decodes by its own
options, capguard.models.sampling), ``log`` (one committed write to the caption log), ``degeneration``
(does the caption loop, judged with its token count; tens of microseconds), ``observe`` (the guard),
``record`` (the metrics). ``generate`` is the
only step that touches the model: swapping how batches are generated changes that function alone.
The answer leaves only after its caption is committed.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np

from capguard.models.config import GenerationConfig
from capguard.models.decoding import effective
from capguard.models.degenerate import Degeneration, degeneration
from capguard.models.stack import CaptionOutput, CaptionStack
from capguard.server.batcher import QueueFull
from capguard.server.decode import DecodedVideo, DecodeFailed
from capguard.server.errors import ApiError, unavailable, video_error
from capguard.server.guard import Guard, GuardState
from capguard.server.storage import CaptionRecord

if TYPE_CHECKING:   # server/state.py builds the batcher around run_batch, so it imports this module
    from capguard.server.state import AppState

log = logging.getLogger(__name__)

COLLAPSED_RETRY_AFTER_S = 300   # a rejected collapsed checkpoint stays so until someone activates another


@dataclasses.dataclass
class CaptionJob:
    checkpoint: str              # name: the batch key, the guard and the log row
    stack: CaptionStack          # chosen (and loaded) on the event loop, so the model thread never loads
    frames: np.ndarray           # (T, H, W, 3) uint8 from the decoder process
    # this request's decoding (the checkpoint's defaults + its own fields, capguard.models.decoding) and
    # max_new_tokens; a batch mixes them. An engine with per-request sampling parameters (vLLM's
    # SamplingParams, seed included) takes it as it is; the hf engine runs it per row (models/sampling.py)
    generation: GenerationConfig
    video_sha256: str            # the guard counts distinct videos by it
    decode_ms: float             # kept in the log row's timings


@dataclasses.dataclass
class CaptionResult:
    output: CaptionOutput        # caption, tokens, score, embeddings
    guard: GuardState            # the verdict right after this caption was observed
    stages_ms: dict[str, float]  # encode/generate/score of the whole batch this video was in
    degenerate: Degeneration | None = None   # the caption loops or hit max_new_tokens (models/degenerate.py)


# -- on the event loop ---------------------------------------------------------------------------------


def _collapsed(state: AppState, name: str) -> bool:
    return state.guards.get(name).state().status == "collapsed"


@dataclasses.dataclass
class Choice:
    name: str                    # the checkpoint that serves the request
    stack: CaptionStack
    fallback_from: str | None = None   # under "fallback": the collapsed checkpoint it stands in for
    reason: list[str] = dataclasses.field(default_factory=list)   # that checkpoint's tripped rules then


async def choose_checkpoint(state: AppState, requested: str | None) -> Choice:
    """The checkpoint to serve with, after collapse_policy.

    "flag" serves whatever it is asked. "reject" answers 503 for a collapsed checkpoint. "fallback"
    serves a request that names no checkpoint from the most recently active loaded one that is not
    collapsed (a request that names one gets that one or a 503: it asked for those weights); the choice
    says which one it stood in for and why, and capguard_fallbacks_total{requested,served} counts it.
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
        return Choice(name, stack)
    if policy == "fallback" and requested is None:
        for other in reversed(checkpoints.history):
            other_stack = checkpoints.loaded(other)
            if other != name and other_stack is not None and not _collapsed(state, other):
                state.metrics.fallbacks.labels(name, other).inc()
                reason = list(state.guards.get(name).state().tripped)
                return Choice(other, other_stack, fallback_from=name, reason=reason)
    raise unavailable("checkpoint_collapsed",
                      f"checkpoint {name!r} is flagged collapsed (its recent captions hardly depend on the video); "
                      "activate a healthy checkpoint (POST /checkpoints/{name}/activate)", COLLAPSED_RETRY_AFTER_S)


async def decode_video(state: AppState, path: str, stack: CaptionStack, num_frames: int | None) -> DecodedVideo:
    """Frames of the upload at `path` for `stack` (its own frame count unless `num_frames`), from a decoder
    process; 503 busy when every decoder has a queue, the video error's status when the file is refused."""
    if state.decoder.full:
        raise unavailable("busy", f"{state.decoder.pending} uploads are already waiting for a decoder")
    try:
        video = await state.decoder.decode(path, num_frames or stack.config.num_frames, state.limits,
                                           stack.frame_side)
    except DecodeFailed as exc:
        raise video_error(exc.code, str(exc)) from None
    state.metrics.stage_seconds.labels("decode").observe(video.seconds)
    return video


async def submit(state: AppState, job: CaptionJob) -> CaptionResult:
    """Queue `job` for the model thread and wait for its committed result; 503 queue_full at capacity.

    One batch = one checkpoint, whatever the frame sizes (stack.caption resizes a batch of mixed sizes
    video by video: a 4:3 and a 16:9 upload in one batch once failed both with a 500).
    """
    try:
        return await state.batcher.submit(job, key=job.checkpoint)
    except QueueFull as exc:
        raise unavailable("queue_full", f"the server is at capacity ({exc}); retry shortly") from None


# -- on the model thread -------------------------------------------------------------------------------


def run_batch(state: AppState, jobs: list[CaptionJob]) -> list[CaptionResult]:
    """Caption one batch (same checkpoint) on the model thread; commit to the log; feed the guard."""
    outputs, stages = generate(jobs)
    stages_ms = {stage: round(seconds * 1000, 3) for stage, seconds in stages.items()}
    log_captions(state, jobs, outputs, stages_ms)
    guard = state.guards.get(jobs[0].checkpoint)
    loops = [degeneration(out.caption, out.num_tokens, job.generation.max_new_tokens)
             for job, out in zip(jobs, outputs, strict=True)]
    states = [observe(guard, job, out, loop) for job, out, loop in zip(jobs, outputs, loops, strict=True)]
    record(state, jobs[0].checkpoint, outputs, states, stages)
    for loop in loops:
        if loop is not None:
            state.metrics.degenerate.labels(jobs[0].checkpoint, loop.kind).inc()
    return [CaptionResult(out, guard_state, stages_ms, loop)
            for out, guard_state, loop in zip(outputs, states, loops, strict=True)]


def generate(jobs: list[CaptionJob]) -> tuple[list[CaptionOutput], dict[str, float]]:
    """The model step: encode the frames, generate the captions, score them, for a batch of one stack.

    Returns (one output per job, seconds per stage {"encode", "generate", "score"} of the whole batch).
    """
    stack = jobs[0].stack
    return stack.caption([job.frames for job in jobs], generation=[job.generation for job in jobs])


def log_captions(state: AppState, jobs: list[CaptionJob], outputs: list[CaptionOutput],
                 stages_ms: dict[str, float]) -> None:
    """One committed transaction for the batch: a caption is answered only once it is in the log."""
    state.storage.append([
        CaptionRecord(checkpoint=job.checkpoint, fingerprint=job.stack.fingerprint, video_sha256=job.video_sha256,
                      caption=out.caption, num_tokens=out.num_tokens, siglip=out.score, text_emb=out.text_emb,
                      video_emb=out.video_emb, timings_ms={"decode": job.decode_ms, **stages_ms, "batch": len(jobs)},
                      decoding=effective(job.generation) | {"max_new_tokens": job.generation.max_new_tokens})
        for job, out in zip(jobs, outputs, strict=True)])


def observe(guard: Guard, job: CaptionJob, out: CaptionOutput, loop: Degeneration | None = None) -> GuardState:
    """guard.observe; a guard that fails (a bug, a changed scorer) is logged and must not fail the caption."""
    try:
        return guard.observe(job.video_sha256, out.caption, out.text_emb, out.video_emb, out.score,
                             degenerate=None if loop is None else loop.kind)
    except Exception:  # noqa: BLE001 - the caption is already committed; answer it with the last verdict
        log.exception("guard of checkpoint %s failed to observe video %s", job.checkpoint, job.video_sha256[:12])
        return dataclasses.replace(guard.state(), newly_tripped=[])   # nothing tripped on this observe


def record(state: AppState, name: str, outputs: list[CaptionOutput], states: list[GuardState],
           stages: dict[str, float]) -> None:
    """The batch's metrics: stage durations, captions and tokens, scores, the guard gauges and trips, and the
    guard history the page's chart draws."""
    metrics = state.metrics
    for stage, seconds in stages.items():
        metrics.stage_seconds.labels(stage).observe(seconds)
    for out, guard_state in zip(outputs, states, strict=True):
        metrics.captions.labels(name).inc()
        metrics.tokens.labels(name).inc(out.num_tokens)
        if out.score is not None:
            metrics.siglip.labels(name).observe(out.score)
        metrics.observe_guard(name, guard_state)
        state.history.add(name, guard_state)
