"""Every request and response body of the HTTP API (docs/api.md), in one place."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from capguard.models.decoding import DecodingRequest

MAX_NUM_FRAMES = 64       # frames per video a client may ask for: bounds decode and encode cost
MAX_NEW_TOKENS = 256      # tokens per caption a client may ask for: bounds generation time


class DecodingFields(BaseModel):
    """The per-request decoding fields (capguard.models.decoding: ranges, combinations and their reasons);
    None keeps the checkpoint's default. A bad value or combination is a 422 that says what to send."""

    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_on_repetition: bool | None = None
    repetition_min_count: int | None = None
    repetition_min_pattern_size: int | None = None

    @model_validator(mode="after")
    def _check(self):
        self.decoding().check()   # ValueError -> a 422 whose message names the field
        return self

    def decoding(self) -> DecodingRequest:
        return DecodingRequest(**{name: getattr(self, name) for name in DecodingRequest.names()})


class CaptionOptions(DecodingFields):
    """The optional text fields of POST /caption (the file field is handled by the upload parser)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, min_length=1, max_length=200)   # None: the active checkpoint
    num_frames: int | None = Field(None, ge=1, le=MAX_NUM_FRAMES)       # None: the checkpoint's num_frames
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)   # None: the checkpoint's default

    @classmethod
    def from_form(cls, fields: dict[str, str]) -> CaptionOptions:
        """Validate form strings; empty fields count as absent. Raises RequestValidationError (-> 422).

        Example: {"num_frames": "8", "checkpoint": ""} -> CaptionOptions(checkpoint=None, num_frames=8).
        """
        try:
            return cls.model_validate({k: v for k, v in fields.items() if v != ""})
        except ValidationError as exc:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                          for err in exc.errors(include_url=False)]) from None


class FramesInfo(BaseModel):
    count: int
    indices: list[int]          # frame index of each sampled frame, presentation order
    timestamps_s: list[float]   # seconds from the first frame


class Scores(BaseModel):
    siglip: float | None        # scorer probability that the caption matches the video; None without a scorer


class Timings(BaseModel):
    """Milliseconds. decode: in the decoder process; encode/generate/score: the batch this video was in;
    total: the whole request, upload and queueing included."""

    decode: float
    encode: float
    generate: float
    score: float
    total: float


class GuardMode(BaseModel):
    """One cluster of near-identical captions in the window: "the model keeps saying this"."""

    representative: str         # the cluster's most frequent original caption
    count: int                  # captions in the cluster (with repeats)
    share: float | None         # count / window captions, 0-1
    variants: int               # distinct normalized captions in it: > 1 means near-duplicate collapse


class GuardInfo(BaseModel):
    """A checkpoint's guard verdict and the figures behind it (capguard.server.guard.GuardState.to_dict()).

    Ratios are 0-1; a figure is null when the window cannot give it (empty, no scorer, not yet computed).
    """

    checkpoint: str
    status: Literal["warming_up", "ok", "collapsed"]
    window_captions: int                # distinct videos in the window
    unique_ratio: float | None          # exact distinct captions / captions
    near_unique_ratio: float | None     # near-duplicate clusters / captions
    top_mode_share: float | None        # share of the largest cluster
    repeat_probability: float | None    # Good-Turing chance the next caption repeats one in the window
    siglip_mean: float | None           # mean scorer probability over the window
    grounding_r1: float | None          # caption -> own video R@1 in the window
    grounding_margin: float | None      # own-video similarity minus the best other video's
    content_unique_ratio: float | None  # distinct content-morpheme keys / captions (particles, endings ignored)
    vendi_score: float | None           # effective number of captions by meaning (1..n); null without a scorer
    degenerate_share: float | None      # share of the window's captions that loop inside themselves
    tripped: list[str]                  # rules tripped now (held until they pass clear_after times)
    newly_tripped: list[str]            # rules that tripped on this observation
    modes: list[GuardMode]              # top clusters, largest first
    thresholds: dict[str, int | float | None]   # the rules in force, so a response explains itself
    metrics_age: int                    # observations since the clustering figures were computed
    clears_in: dict[str, int]           # tripped rule now passing -> passing evaluations still needed


class Decoding(BaseModel):
    """How this caption was decoded: the checkpoint's defaults with the request's fields (models/decoding.py).
    Sampling-only fields are null when the caption was not sampled; a sampled one always has its seed."""

    do_sample: bool
    temperature: float | None
    top_p: float | None
    top_k: int | None           # 0: no top-k limit
    num_beams: int
    repetition_penalty: float
    seed: int | None            # send it back with the same video and checkpoint to get the same caption
    stop_on_repetition: bool    # the engine ends the caption once its last tokens repeat
    repetition_min_count: int | None          # copies in a row that stop it; null when the stop is off
    repetition_min_pattern_size: int | None   # tokens in the shortest pattern that counts; null when off


class Fallback(BaseModel):
    """Under collapse_policy=fallback: the checkpoint asked for, and why another one answered."""

    requested: str              # the checkpoint the request would have used (the active one)
    reason: list[str]           # its guard rules tripped at the time (e.g. ["unique_ratio", "grounding_r1"])


class GuardPoint(BaseModel):
    """The guard of one checkpoint after a caption (server/history.py); figures 0-1, null when unavailable."""

    t: float                    # unix seconds
    captions_seen: int          # captions this checkpoint served since the server started (0: restored)
    window_captions: int
    status: Literal["warming_up", "ok", "collapsed"]
    tripped: list[str]
    unique_ratio: float | None
    near_unique_ratio: float | None
    top_mode_share: float | None
    grounding_r1: float | None
    siglip_mean: float | None
    repeat_probability: float | None
    content_unique_ratio: float | None
    degenerate_share: float | None
    vendi_score: float | None   # not 0-1 (1 to the window's size): in each point, not drawn on the chart


class RuleLine(BaseModel):
    figure: str                 # the figure the rule reads, e.g. "unique_ratio"
    kind: Literal["min", "max"]   # min: trips below the value; max: trips above it
    value: float


class GuardHistoryInfo(BaseModel):
    """GET /checkpoints/{name}/guard/history: the figures over time and the rule lines to draw with them."""

    checkpoint: str
    every: int                  # captions per point
    figures: list[str]          # the figure names each point carries
    points: list[GuardPoint]    # oldest first; the last `history_points` only
    rules: list[RuleLine]

class DegenerateInfo(BaseModel):
    """Why this caption reads as degenerate (capguard.models.degenerate.Degeneration.to_dict())."""

    kind: Literal["repeated_sentence", "repeated_ngram", "token_limit", "repetition_stop"]
    period: int                 # units (Hangul syllables; other words weigh 2) in one copy; 0 for token_limit
    repeats: float              # copies in the run, a trailing partial copy as a fraction
    coverage: float             # units inside the run / units in the caption, 0-1
    text: str                   # one copy of the repeating phrase or sentence, "" for token_limit
    hit_token_limit: bool       # generation stopped at max_new_tokens


class CaptionResponse(BaseModel):
    caption: str
    checkpoint: str             # the checkpoint that wrote it (the fallback one under collapse_policy=fallback)
    fallback: Fallback | None = None   # set when `checkpoint` is not the one asked for (collapse_policy=fallback)
    decoding: Decoding          # the decoding options in effect
    fingerprint: str            # sha256 of its weights
    video_sha256: str
    frames: FramesInfo
    scores: Scores
    guard: GuardInfo            # the checkpoint's guard right after this caption was observed
    degenerate: DegenerateInfo | None   # the caption loops or was cut at max_new_tokens; null if neither
    # why generation ended: "stop" (EOS), "length" (max_new_tokens), "repetition" (stop_on_repetition ended it)
    finish_reason: Literal["stop", "length", "repetition"] | None = None
    timings_ms: Timings


class CheckpointInfo(BaseModel):
    name: str                   # path under checkpoints_root, e.g. "demo" or "runs/epoch-3"
    fingerprint: str | None     # None until loaded (hashing weights costs a read of every file)
    projector_type: str | None  # None when capguard.json cannot be read (see error)
    loaded: bool
    active: bool                # serves requests that name no checkpoint
    default: bool
    guard_status: str | None    # warming_up | ok | collapsed; None until loaded
    error: str | None = None    # why the checkpoint cannot be read or loaded


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointInfo]


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    checkpoint: str
    fingerprint: str


class EvaluationRequest(DecodingFields):
    """POST /evaluations: what to evaluate. Bounds beyond these come from settings (evaluation_max_*)."""

    model_config = ConfigDict(extra="forbid")

    checkpoints: list[str] = Field(min_length=1, max_length=100)   # names as GET /checkpoints lists them
    dataset: str = Field(min_length=1, max_length=500)   # manifest or video dir, relative to datasets_root
    limit: int | None = Field(None, ge=1)                # the first N videos only
    num_frames: int | None = Field(None, ge=1, le=MAX_NUM_FRAMES)   # None: each checkpoint's own
    references: Literal["auto", "ko", "en", "none"] = "auto"       # which manifest captions score BLEU etc.
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)   # None: each checkpoint's own
    # + the decoding fields (DecodingFields), applied to every checkpoint's own defaults


class CaptionsEvaluationRequest(BaseModel):
    """POST /evaluations with caption files from any pipeline (capguard.models.captions_file), one report row
    each, instead of checkpoints; or upload them as multipart ``captions`` file fields."""

    model_config = ConfigDict(extra="forbid")

    captions: list[str] = Field(min_length=1, max_length=100)   # JSONL files relative to datasets_root
    videos: str | None = Field(None, min_length=1, max_length=500)   # dir the rows' video_path are relative
    #                                                   to (relative to datasets_root); None: each file's own dir
    num_frames: int | None = Field(None, ge=1, le=MAX_NUM_FRAMES)   # frames the scorer samples (None: 8)


class EvaluationProgress(BaseModel):
    done: int                   # videos captioned so far, over all checkpoints
    total: int                  # checkpoints x videos


class EvaluationLinks(BaseModel):
    self: str
    report_html: str            # 404 until the first checkpoint is finished
    cancel: str                 # POST (admin)


class EvaluationJob(BaseModel):
    id: str                     # uuid4 hex, made by the server
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    checkpoints: list[str]
    dataset: str                # as requested, relative to datasets_root
    limit: int | None
    num_frames: int | None
    references: str
    max_new_tokens: int | None = None
    decoding: dict[str, Any] = {}     # the decoding fields the job was asked for ({}: each checkpoint's defaults)
    progress: EvaluationProgress
    error: str | None           # why it failed or was cancelled
    attempts: int               # runs started: more than 1 when a restart interrupted it and it was resumed
    created_at: datetime
    started_at: datetime | None   # of the latest attempt
    finished_at: datetime | None
    links: EvaluationLinks
    report: dict[str, Any] | None = None   # report.json once the job is over (partial if it failed)


class EvaluationList(BaseModel):
    evaluations: list[EvaluationJob]   # newest first, without their reports


class ErrorBody(BaseModel):
    code: str                   # stable, machine-readable
    message: str                # what was wrong and what to do


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the error statuses a route can answer."""
    return {status: {"model": ErrorResponse} for status in statuses}
