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

An engine that batches continuously (``engine.continuous``: vllm) splits ``generate`` in three, like
vLLM's API server in front of its EngineClient: the model thread encodes and projects a batch
(``EncodeJob`` -> ``Prompt``), then each request awaits ``engine.generate_one`` on its own, entering the
engine's running batch the moment its prompt is ready and leaving it the step it finishes; the
finished ones meet again on the model thread (``ScoreJob``) to be scored, logged, observed and recorded
together. A client that goes away cancels its request in the engine (``engine.abort``). The hf engine
keeps the one-step path: its static batches are fastest whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from capguard.models.captioner import Generated
from capguard.models.config import GenerationConfig
from capguard.models.decoding import effective
from capguard.models.degenerate import Degeneration, judge
from capguard.models.engines import EngineError
from capguard.models.stack import CaptionOutput, CaptionStack, outputs
from capguard.server.batcher import QueueFull
from capguard.server.decode import DecodedVideo, DecodeFailed
from capguard.server.errors import ApiError, unavailable, video_error
from capguard.server.guard import Guard, GuardState
from capguard.server.storage import CaptionRecord

if TYPE_CHECKING:   # server/state.py builds the batcher around run_batch, so it imports this module
    from capguard.server.state import AppState

log = logging.getLogger(__name__)

T = TypeVar("T")
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
    stages_ms: dict[str, float]  # encode/score of the batch this video was in; generate: its batch's, or its own
    degenerate: Degeneration | None = None   # the caption loops or hit max_new_tokens (models/degenerate.py)


@dataclasses.dataclass
class EncodeJob:
    """A continuous engine's first model step: encode and project one video (batched with others)."""
    job: CaptionJob


@dataclasses.dataclass
class Prompt:
    embeds: torch.Tensor               # (L, D_llm) = [prompt prefix | visual tokens | prompt suffix]
    image_emb: torch.Tensor | None     # (T, E) pooled frame features for the scorer (None: it has its own tower)
    encode_s: float                    # the encode batch's seconds


@dataclasses.dataclass
class ScoreJob:
    """A continuous engine's last model step: score, log, observe and record one finished caption."""
    job: CaptionJob
    prompt: Prompt
    generated: Generated
    generate_s: float                  # this request's own time in the engine


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
    engine = job.stack.engine
    if engine is None or not engine.continuous:
        return await _queued(state, job, job.checkpoint)
    if state.generating >= state.settings.queue_size:   # backpressure: requests in the engine are bounded too
        raise unavailable("queue_full", f"the server is at capacity ({state.generating} requests are in the "
                                        f"{engine.name} engine); retry shortly")
    state.generating += 1
    try:
        prompt = await _queued(state, EncodeJob(job), job.checkpoint)
        generated, seconds = await generate_one(state, job, prompt)
        return await _queued(state, ScoreJob(job, prompt, generated, seconds), (job.checkpoint, "score"))
    finally:
        state.generating -= 1


async def cancel_on_disconnect(receive, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client goes away first: then cancel it (a continuous engine aborts the request,
    so a client that gave up holds no slot in the running batch) and answer 499 client_closed_request.

    ``receive`` is the request's ASGI receive: once the body is read, its next message is http.disconnect.
    """
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)   # the abort runs before we answer
        raise ApiError(499, "client_closed_request", "the client closed the connection before the caption was ready")
    finally:
        watcher.cancel()
        task.cancel()   # a no-op once done; when this route itself is cancelled (shutdown), so is the work


async def _queued(state: AppState, job, key) -> CaptionResult | Prompt:
    try:
        return await state.batcher.submit(job, key=key)
    except QueueFull as exc:
        raise unavailable("queue_full", f"the server is at capacity ({exc}); retry shortly") from None


async def generate_one(state: AppState, job: CaptionJob, prompt: Prompt) -> tuple[Generated, float]:
    """One request through a continuous engine, concurrently with every other; (generated, its seconds).

    Cancelled (the client went away, the server stops): the request is aborted in the engine, so it stops
    taking a slot in the running batch. A dead engine answers 503, and its checkpoints reload (a new engine)
    on their next request.
    """
    engine, request_id = job.stack.engine, f"cap-{uuid.uuid4().hex[:16]}"
    started = time.perf_counter()
    try:
        generated = await engine.generate_one(prompt.embeds, job.generation, request_id,
                                              job.generation.max_new_tokens)
    except asyncio.CancelledError:
        log.info("request %s cancelled (client gone?): aborting it in the %s engine", request_id, engine.name)
        await asyncio.shield(engine.abort(request_id))
        raise
    except EngineError as exc:
        log.error("checkpoint %s: %s", job.checkpoint, exc)
        state.checkpoints.drop_dead_engines()
        raise unavailable("engine_unavailable", f"the {engine.name} engine cannot serve: {exc}", 30) from None
    return generated, time.perf_counter() - started


# -- on the model thread -------------------------------------------------------------------------------


def run_batch(state: AppState, jobs: list) -> list:
    """One batch (same checkpoint, same kind of job) on the model thread: a whole CaptionJob batch is captioned,
    committed to the log and fed to the guard; a continuous engine's EncodeJobs and ScoreJobs do either end."""
    if isinstance(jobs[0], EncodeJob):
        prompts = encode([e.job for e in jobs])
        state.metrics.stage_seconds.labels("encode").observe(prompts[0].encode_s)
        return prompts
    if isinstance(jobs[0], ScoreJob):
        outs, seconds = score(jobs)
        stages = [{"encode": j.prompt.encode_s, "generate": j.generate_s, "score": seconds} for j in jobs]
        for j in jobs:
            state.metrics.stage_seconds.labels("generate").observe(j.generate_s)   # per request: no batch here
        return finish(state, [j.job for j in jobs], outs, stages, {"score": seconds})
    outs, stages = generate(jobs)
    return finish(state, jobs, outs, [stages] * len(jobs), stages)


def finish(state: AppState, jobs: list[CaptionJob], outs: list[CaptionOutput], stages: list[dict[str, float]],
           batch_stages: dict[str, float]) -> list[CaptionResult]:
    """Commit, observe and record a batch of captions; ``stages`` per job, ``batch_stages`` observed once."""
    stages_ms = [{stage: round(seconds * 1000, 3) for stage, seconds in st.items()} for st in stages]
    log_captions(state, jobs, outs, stages_ms)
    guard = state.guards.get(jobs[0].checkpoint)
    loops = [judge(out.caption, out.num_tokens, job.generation.max_new_tokens, out.finish_reason)
             for job, out in zip(jobs, outs, strict=True)]
    states = [observe(guard, job, out, loop) for job, out, loop in zip(jobs, outs, loops, strict=True)]
    record(state, jobs[0].checkpoint, outs, states, batch_stages)
    for loop in loops:
        if loop is not None:
            state.metrics.degenerate.labels(jobs[0].checkpoint, loop.kind).inc()
    for out in outs:   # the engine ended it early (stop_on_repetition); the detector above judged the text first
        if out.finish_reason == "repetition":
            state.metrics.repetition_stops.labels(jobs[0].checkpoint, jobs[0].stack.engine_name).inc()
    return [CaptionResult(out, guard_state, ms, loop)
            for out, guard_state, ms, loop in zip(outs, states, stages_ms, loops, strict=True)]


def generate(jobs: list[CaptionJob]) -> tuple[list[CaptionOutput], dict[str, float]]:
    """The model step: encode the frames, generate the captions, score them, for a batch of one stack.

    Returns (one output per job, seconds per stage {"encode", "generate", "score"} of the whole batch).
    """
    stack = jobs[0].stack
    return stack.caption([job.frames for job in jobs], generation=[job.generation for job in jobs])


@torch.inference_mode()   # no autograd graph (and the prompt embeddings' cache applies)
def encode(jobs: list[CaptionJob]) -> list[Prompt]:
    """A continuous engine's first step for a batch of one stack: each job's (L, D_llm) prompt."""
    stack = jobs[0].stack
    started = time.perf_counter()
    visual, image_emb = stack.encode([job.frames for job in jobs])
    embeds = [stack.captioner.sequence(v) for v in visual]                        # (L_i, D_llm) each
    per_video = (torch.split(image_emb, [len(job.frames) for job in jobs]) if image_emb is not None
                 else [None] * len(jobs))                                         # (T_i, E) each
    seconds = time.perf_counter() - started
    return [Prompt(e, im, seconds) for e, im in zip(embeds, per_video, strict=True)]


def score(jobs: list[ScoreJob]) -> tuple[list[CaptionOutput], float]:
    """A continuous engine's last model step: score a batch of finished captions of one stack; (outputs, seconds)."""
    stack, started = jobs[0].job.stack, time.perf_counter()
    generated = [j.generated for j in jobs]
    scored = None
    if stack.scorer is not None:
        pooled = [j.prompt.image_emb for j in jobs]
        image_emb = torch.cat(pooled) if all(p is not None for p in pooled) else None   # (sum T, E)
        scored = stack.score([j.job.frames for j in jobs], [g.text for g in generated], image_emb)
    return outputs(generated, scored), time.perf_counter() - started


def log_captions(state: AppState, jobs: list[CaptionJob], outputs: list[CaptionOutput],
                 stages_ms: list[dict[str, float]]) -> None:
    """One committed transaction for the batch: a caption is answered only once it is in the log."""
    state.storage.append([
        CaptionRecord(checkpoint=job.checkpoint, fingerprint=job.stack.fingerprint, video_sha256=job.video_sha256,
                      caption=out.caption, num_tokens=out.num_tokens, siglip=out.score, text_emb=out.text_emb,
                      video_emb=out.video_emb, timings_ms={"decode": job.decode_ms, **ms, "batch": len(jobs)},
                      decoding=effective(job.generation) | {"max_new_tokens": job.generation.max_new_tokens,
                                                             "finish_reason": out.finish_reason})
        for job, out, ms in zip(jobs, outputs, stages_ms, strict=True)])


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
