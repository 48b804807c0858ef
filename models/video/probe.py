"""Header only: open a file with FFmpeg, find its video stream, read its facts and enforce the limits.

Nothing here decodes an RGB frame, so a small file that declares 16384x16384 or millions of frames is
refused for next to nothing. ``open_container``, ``video_stream`` and ``ffmpeg_reason`` are shared with the
PyAV backend.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import av

from capguard.models.video.errors import DurationTooLong, NotAVideo, ResolutionTooLarge, VideoTooLarge
from capguard.models.video.meta import VideoLimits, VideoMeta
from capguard.models.video.rotation import ISO_CONTAINER, display_rotation

# demuxers that open things that are not videos: text (tty renders .txt as ANSI art) and still images
_NOT_VIDEO_DEMUXERS = {"tty", "image2", "image2pipe", "bin", "xbin", "adf", "idf"}
_STILL_DISPOSITIONS = ("attached_pic", "still_image", "timed_thumbnails")


def probe(path: str | os.PathLike, limits: VideoLimits = VideoLimits()) -> VideoMeta:
    """Header facts of the video at `path`; a VideoError subclass when it breaks a limit or is no video.

    Reads the container header and whatever FFmpeg needs to identify the streams (at most a frame or two,
    never one over limits.max_pixels); no RGB frame is made, so a small file declaring 16384x16384 costs
    next to nothing.
    """
    path = os.fspath(path)
    _check_size(path, limits)
    with open_container(path, limits) as container:
        meta = _header_meta(container, video_stream(container, path))
    _check_header(meta, limits, path)
    if meta.container == ISO_CONTAINER:
        meta = dataclasses.replace(meta, rotation=display_rotation(path))
    return meta


def _check_size(path: str, limits: VideoLimits) -> None:
    size = os.path.getsize(path)  # a missing file is the caller's error: FileNotFoundError propagates
    if size == 0:
        raise NotAVideo(f"{path} is empty (0 bytes)")
    if size > limits.max_bytes:
        raise VideoTooLarge(f"{path} is {size / 2**20:.1f} MiB, over the {limits.max_bytes / 2**20:.0f} MiB "
                            "limit; upload a shorter or more compressed video")


def open_container(path: str, limits: VideoLimits) -> Any:
    """av.open for reading, with FFmpeg's failures turned into NotAVideo.

    FFmpeg decodes a frame or two while it identifies the streams; max_pixels makes it refuse frames over
    the limit instead of allocating them (the stream then reports a 0x0 size, see _check_header).
    """
    try:
        # metadata_errors="replace": a damaged tag must not raise UnicodeDecodeError
        return av.open(path, metadata_errors="replace", options={"max_pixels": str(limits.max_pixels)})
    except av.FFmpegError as exc:
        raise NotAVideo(f"{path} could not be opened as a media container ({ffmpeg_reason(exc)}): it is no "
                        "video, or a badly damaged one (an .mp4 cut short before its index, the moov atom, "
                        "cannot be opened; upload the whole file)") from exc


def ffmpeg_reason(exc: BaseException) -> str:
    """FFmpeg's message without the file name PyAV appends."""
    return getattr(exc, "strerror", None) or str(exc)


def video_stream(container: Any, path: str) -> Any:
    """The first real video stream: not a still image, cover art or text rendered as video."""
    fmt = container.format.name
    if fmt in _NOT_VIDEO_DEMUXERS or fmt.endswith("_pipe"):
        raise NotAVideo(f"{path} is not a video: FFmpeg reads it as {fmt!r} (a still image or text)")
    streams = [s for s in container.streams.video
               if not any(s.disposition & getattr(av.stream.Disposition, d) for d in _STILL_DISPOSITIONS)]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise NotAVideo(f"{path} has no video stream (streams: {', '.join(kinds)}; container {fmt})")
    stream = streams[0]
    if stream.codec_context is None:
        raise NotAVideo(f"{path}: this FFmpeg build has no decoder for its video codec (container {fmt})")
    return stream


def _header_meta(container: Any, stream: Any) -> VideoMeta:
    ctx = stream.codec_context
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    return VideoMeta(fps=float(rate) if rate else 0.0, duration_s=duration, num_frames=max(0, stream.frames),
                     codec=ctx.codec.canonical_name, width=ctx.width, height=ctx.height,
                     container=container.format.name, has_b_frames=bool(ctx.has_b_frames))


def _check_header(meta: VideoMeta, limits: VideoLimits, path: str) -> None:
    if meta.width <= 0 or meta.height <= 0:
        # what a frame size over max_pixels looks like through _open (a corrupt first frame within the
        # limit keeps the declared size); the size is not read without the cap, to never decode such a frame
        raise ResolutionTooLarge(f"{path}: FFmpeg will not open its {meta.codec} decoder within the limit "
                                 f"of {limits.max_pixels} pixels per frame: its frames are larger "
                                 "(or their size is unreadable)")
    if meta.width * meta.height > limits.max_pixels:
        pixels = meta.width * meta.height
        raise ResolutionTooLarge(f"{path} is {meta.width}x{meta.height} ({pixels} pixels), over the limit of "
                                 f"{limits.max_pixels} pixels; downscale it before uploading")
    if meta.duration_s > limits.max_duration_s:
        raise DurationTooLong(f"{path} lasts {meta.duration_s:.1f} s, over the {limits.max_duration_s:.0f} s "
                              "limit; trim it before uploading")
    if meta.num_frames > limits.max_frames:
        raise DurationTooLong(f"{path} declares {meta.num_frames} frames, over the limit of "
                              f"{limits.max_frames}")
