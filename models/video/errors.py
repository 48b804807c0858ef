"""Why a video cannot be sampled: one exception per reason, each with a stable ``code`` the server maps to HTTP."""

from __future__ import annotations


class VideoError(Exception):
    """A video that cannot be sampled; `code` is stable and machine-readable (the server maps it to HTTP)."""

    code = "video_error"


class VideoTooLarge(VideoError):
    code = "video_too_large"


class ResolutionTooLarge(VideoError):
    code = "resolution_too_large"


class DurationTooLong(VideoError):
    code = "duration_too_long"


class NotAVideo(VideoError):
    code = "not_a_video"


class CorruptVideo(VideoError):
    code = "corrupt_video"
