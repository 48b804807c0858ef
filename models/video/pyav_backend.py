"""The PyAV (FFmpeg) path: one demux pass lists every frame, then the wanted frames are decoded.

In mp4/mov and matroska/webm, whose packets carry true presentation times, each wanted frame is found by
seeking to the keyframe before it and decoding forward to its pts; elsewhere (AVI: PyAV's timestamps there
mislabel B-frames) frames are decoded in order from the start. A seek that lands wrong falls back to
decoding in order; never a wrong frame. The demux pass (``read_packets``, no decoding, ~10 ms for a 60 s
clip) also runs before decord is handed a file, so truncated files end as CorruptVideo without reaching it.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np

from capguard.models.video.errors import CorruptVideo, DurationTooLong
from capguard.models.video.meta import SampledFrames, VideoLimits, VideoMeta, sample_indices
from capguard.models.video.probe import ffmpeg_reason, open_container, video_stream

log = logging.getLogger(__name__)

# containers whose packets carry true presentation times: PyAV may seek and identify frames by pts
_PTS_CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"}


@dataclass
class _PacketTable:
    """What one demux pass (no decoding) learns about the video stream's frames."""

    pts: list[int]              # presentation time of every frame, ascending: pts[i] is frame i
    keyframes: list[int]        # pts of the keyframes, ascending: where decoding can start
    seek_to: dict[int, int]     # keyframe pts -> timestamp to seek to (its dts: the mp4 index is in dts)
    pts_reliable: bool          # every packet had a distinct pts (else frames are counted in decode order)
    count: int                  # frames (packets with data), equal to len(pts) when pts_reliable
    fps: float                  # frames per second of the pts span, for headers without a frame rate


def read_packets(path: str, meta: VideoMeta, limits: VideoLimits) -> _PacketTable:
    """The packet table of the video at `path`; CorruptVideo when frames are missing."""
    with open_container(path, limits) as container:
        table = _packet_table(container, video_stream(container, path), meta, limits, path)
    declared = meta.num_frames
    if table.count == 0:
        raise CorruptVideo(f"{path}: the {meta.codec} stream has no frames that can be read")
    if declared and table.count < declared - max(1, declared // 100):
        raise CorruptVideo(f"{path} declares {declared} frames but only {table.count} can be read: the file "
                           "is truncated or damaged (an incomplete upload?)")
    return table


def sample_pyav(path: str, meta: VideoMeta, table: _PacketTable, num_frames: int,
                 size: tuple[int, int] | None, limits: VideoLimits) -> SampledFrames:
    indices = sample_indices(table.count, num_frames)
    wanted = sorted(set(indices))
    # every frame converted to one size, the header's (already checked against max_pixels) unless scaled:
    # a stream may change resolution midway (concatenated HLS/TS segments), and frames must stack
    size = size or (meta.width, meta.height)
    fps = meta.fps or table.fps
    # AVI and the like hold no presentation times: PyAV makes some up, which mislabel B-frames
    trust_pts = table.pts_reliable and meta.container in _PTS_CONTAINERS
    decoded = None
    if trust_pts:
        with open_container(path, limits) as container:
            stream = video_stream(container, path)
            decoded = _decode_by_seeking(container, stream, table, wanted, size, limits)
    if decoded is None:
        with open_container(path, limits) as container:
            stream = video_stream(container, path)
            decoded = _decode_in_order(container, stream, table, trust_pts, wanted, size, limits, fps, path)
    images, times = decoded
    counted = dataclasses.replace(meta, num_frames=table.count, fps=fps,
                                  duration_s=meta.duration_s or (table.count / fps if fps else 0.0))
    return SampledFrames(frames=np.stack([images[i] for i in indices]), indices=indices,
                         timestamps_s=[times[i] for i in indices], meta=counted, backend="pyav")


def _packet_table(container: Any, stream: Any, meta: VideoMeta, limits: VideoLimits,
                  path: str) -> _PacketTable:
    """Demux every packet of the stream (cheap: no decoding) and enforce the limits a header may not declare.

    Past a limit: DurationTooLong when the header was silent, CorruptVideo when the header said otherwise
    (garbage timestamps in a damaged index are not a long video).
    """
    too_many = CorruptVideo if meta.num_frames else DurationTooLong
    too_long = CorruptVideo if meta.duration_s else DurationTooLong
    pts: list[int] = []
    seek_to: dict[int, int] = {}
    reliable = True
    count = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:
                continue  # end-of-stream flush packets, and edit-list preroll the decoder drops
            count += 1
            if count > limits.max_frames:
                raise too_many(f"{path} has more than {limits.max_frames} frames "
                               f"(declared: {meta.num_frames or 'none'})")
            if packet.pts is None:
                reliable = False
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                seek_to[packet.pts] = min(packet.pts, packet.dts if packet.dts is not None else packet.pts)
    except av.FFmpegError as exc:
        raise CorruptVideo(f"{path}: reading packet {count} failed ({ffmpeg_reason(exc)}); "
                           "the file is damaged") from exc
    pts.sort()
    span = float((pts[-1] - pts[0]) * stream.time_base) if len(pts) > 1 and stream.time_base else 0.0
    if span > limits.max_duration_s:
        raise too_long(f"{path}: its frames span {span:.1f} s (declared: {meta.duration_s:.1f} s), over the "
                       f"{limits.max_duration_s:.0f} s limit")
    reliable = reliable and len(set(pts)) == count and bool(seek_to)
    return _PacketTable(pts=pts, keyframes=sorted(seek_to), seek_to=seek_to, pts_reliable=reliable,
                        count=count, fps=(len(pts) - 1) / span if span else 0.0)


def _prepare_decoder(stream: Any, limits: VideoLimits) -> None:
    ctx = stream.codec_context
    ctx.thread_type = "AUTO"  # frame + slice threads
    ctx.options = {"max_pixels": str(limits.max_pixels)}  # a stream that grows mid-file fails, not allocates


def _frames(container: Any, stream: Any, errors: list[str]):
    """Decoded frames from the current position; packets that fail to decode are recorded in `errors`."""
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.FFmpegError as exc:
            errors.append(ffmpeg_reason(exc))


def _to_rgb(frame: Any, size: tuple[int, int] | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, scaled by swscale during the colour conversion when `size` is set."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(format="rgb24", width=size[0], height=size[1])


def _decode_by_seeking(container: Any, stream: Any, table: _PacketTable, wanted: list[int],
                       size: tuple[int, int] | None, limits: VideoLimits):
    """{index: frame}, {index: seconds} by seeking to the keyframe before each wanted frame; None on doubt.

    Frames are identified by pts, so a result is exact or None (the caller then decodes in order).
    Decoding continues forward instead of seeking when no keyframe lies between here and the target.
    """
    _prepare_decoder(stream, limits)
    time_base, first = stream.time_base, table.pts[0]
    images: dict[int, np.ndarray] = {}
    times: dict[int, float] = {}
    errors: list[str] = []
    frames = None
    position = None  # pts of the last decoded frame, None right after a seek
    try:
        for index in wanted:
            target = table.pts[index]
            key = table.keyframes[max(0, bisect.bisect_right(table.keyframes, target) - 1)]
            if frames is None or position is None or key > position:
                container.seek(table.seek_to[key], stream=stream)
                frames = _frames(container, stream, errors)
                position = None
            for frame in frames:
                if frame.pts is None or (position is not None and frame.pts <= position):
                    log.warning("PyAV: frame pts out of order after a seek; decoding in order instead")
                    return None
                position = frame.pts
                if frame.pts >= target:
                    break
            if position != target:
                log.warning("PyAV: seeking missed frame %d (pts %s, got %s; %d decode errors); "
                            "decoding in order", index, target, position, len(errors))
                return None
            images[index] = _to_rgb(frame, size)
            times[index] = round(float((target - first) * time_base), 6)
    except av.FFmpegError as exc:
        log.warning("PyAV: seek/decode failed (%s); decoding in order instead", ffmpeg_reason(exc))
        return None
    if errors:
        log.info("PyAV: %d packets failed to decode; the sampled frames decoded fine", len(errors))
    return images, times


def _decode_in_order(container: Any, stream: Any, table: _PacketTable, trust_pts: bool, wanted: list[int],
                     size: tuple[int, int] | None, limits: VideoLimits, fps: float, path: str):
    """{index: frame}, {index: seconds} by decoding from the start up to the last wanted frame.

    With trusted pts a frame's index is its pts' rank; otherwise (AVI and other containers without
    presentation times) it is its position in the decoder's output, which is only exact if no packet
    failed, so then any decode error is fatal.
    """
    _prepare_decoder(stream, limits)
    by_pts = {p: i for i, p in enumerate(table.pts)} if trust_pts else None
    remaining = set(wanted)
    images: dict[int, np.ndarray] = {}
    stamps: dict[int, int | None] = {}
    errors: list[str] = []
    output_pts: list[int | None] = []
    try:
        for position, frame in enumerate(_frames(container, stream, errors)):
            if by_pts is None and errors:
                break
            index = by_pts.get(frame.pts) if by_pts is not None else position
            output_pts.append(frame.pts)
            if index in remaining:
                images[index] = _to_rgb(frame, size)
                stamps[index] = frame.pts
                remaining.discard(index)
                if not remaining:
                    break
    except av.FFmpegError as exc:
        errors.append(ffmpeg_reason(exc))
    if remaining:
        first_missing = min(remaining)
        detail = f"; first decoder error: {errors[0]}" if errors else ""
        raise CorruptVideo(f"{path}: frame {first_missing} of {table.count} could not be decoded "
                           f"({len(errors)} packets failed{detail}); the file is damaged")
    first = table.pts[0] if trust_pts else None
    return images, _timestamps(stamps, output_pts, stream.time_base, fps, first)


def _timestamps(stamps: dict[int, int | None], output_pts: list[int | None], time_base: Fraction,
                fps: float, first: int | None) -> dict[int, float]:
    """Seconds from the first frame: from pts when the decoder's pts rise steadily, else index / fps."""
    known = [p for p in output_pts if p is not None]
    steady = len(known) == len(output_pts) and all(a < b for a, b in itertools.pairwise(known))
    if steady and known and time_base:
        first = known[0] if first is None else first
        return {i: round(float((p - first) * time_base), 6) for i, p in stamps.items()}
    if not fps:
        raise CorruptVideo("the video stream has neither usable timestamps nor a frame rate")
    return {i: round(i / fps, 6) for i in stamps}
