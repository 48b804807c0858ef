"""Frame sampling: read a video file's header, enforce upload limits, decode a few evenly spaced frames.

    meta = probe("clip.mp4")                        # header only; raises before any frame is decoded
    sample = sample_frames("clip.mp4", num_frames=8, max_side=448)
    sample.frames.shape                             # (8, H, W, 3) uint8 RGB
    sample.indices, sample.timestamps_s             # which frames, and when they are shown

Frame index i is the i-th frame in presentation order; timestamps are presentation times relative
to the first frame. Both backends are checked against this definition by tests/test_video.py.

Backends. decord (fast C++ random access) is used for the codecs and containers where it returns
the frame it is asked for; PyAV (FFmpeg) for everything else and whenever decord fails. Measured
with decord 0.6.0 here: it returns wrong frames for HEVC, for MPEG-4 Part 2 with B-frames and for
H.264 with B-frames in AVI (AVI stores no presentation times), cannot open AV1, and fails on some
output widths (48, 72, ...). Decord is only ever given a file path, never bytes: with bytes it
segfaults on some damaged files. Before auto hands it a file, one PyAV demux pass (no decoding, ~10 ms
for a 60 s clip) checks that the declared frames are all there, so truncated files end as CorruptVideo
without reaching decord. It can still abort the process on some damaged file, which is why the server
calls this module in a worker process.

Rotation. Phones store a portrait video as landscape frames plus a display matrix in the mp4/mov track
header. ``display_rotation`` reads it from the file (a few header reads, no decoding, the same matrix
product and angle FFmpeg computes) and both backends return frames turned upright, so the captioner and
the scorer see what a player shows; ``meta.rotation`` says by how much. Right angles only (a mirror or a
skew in the matrix is ignored); other containers are taken as upright (their rotation tags are rare).
decord turns such frames itself (the same way) but returns scrambled ones when it also scales them
(decord 0.6.0, measured here), so rotated videos are decoded by PyAV and turned here.

PyAV. The demux pass lists every frame's pts. In mp4/mov and matroska/webm, whose packets carry true
presentation times, each wanted frame is found by seeking to the keyframe before it and decoding
forward to its pts; elsewhere (AVI: PyAV's timestamps there mislabel B-frames) frames are decoded in
order from the start. A seek that lands wrong falls back to decoding in order; never a wrong frame.

Shared libraries. decord bundles an old FFmpeg and libvpx and loads them with RTLD_GLOBAL; imported
before PyAV, its libvpx shadows PyAV's and VP8/VP9 *encoding* fails. This module imports av at the
top and decord only inside the function that uses it, so av always wins.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int = 512 * 2**20       # upload size; checked with os.path.getsize before the file is opened
    max_pixels: int = 3840 * 2160      # width * height from the header: 4K is the largest accepted frame
    max_duration_s: float = 600.0      # header duration (or the packets' time span when the header has none)
    max_frames: int = 100_000          # declared or counted frames: a tiny file can declare millions


@dataclass
class VideoMeta:
    fps: float           # average frame rate; 0.0 when neither header nor packets tell
    duration_s: float    # seconds; 0.0 when unknown from the header (sample_frames fills it in)
    num_frames: int      # frames in the video; from probe: as declared, 0 = not declared (webm, mkv)
    codec: str           # FFmpeg codec name: h264, hevc, mpeg4, vp8, vp9, av1, ...
    width: int           # coded frame size in pixels, before the display rotation
    height: int
    container: str       # FFmpeg demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"
    has_b_frames: bool = False  # the decoder reorders frames; decord misplaces such frames in some codecs
    rotation: int = 0    # counter-clockwise degrees (0/90/180/270) the frames are turned for display


@dataclass
class SampledFrames:
    frames: np.ndarray          # (T, H, W, 3) uint8 RGB, upright (meta.rotation applied); H, W within max_side
    indices: list[int]          # (T,) frame index of each sampled frame in presentation order
    timestamps_s: list[float]   # (T,) presentation time of each, seconds from the first frame
    meta: VideoMeta             # num_frames/duration/fps as counted while sampling, not just declared
    backend: str                # "decord" | "pyav": which decoder produced the frames


BACKENDS = ("auto", "decord", "pyav")

# codec -> containers in which decord returns exact frames even with B-frames (see module docstring);
# without B-frames these codecs are exact in any container decord opens.
_DECORD_CODECS = {"h264", "hevc", "mpeg4", "vp8", "vp9"}
_DECORD_REORDER_OK = {"h264": ("mov,mp4,m4a,3gp,3g2,mj2",), "vp8": None, "vp9": None}  # None: any container
# containers whose packets carry true presentation times: PyAV may seek and identify frames by pts
_PTS_CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"}
_ISO_CONTAINER = "mov,mp4,m4a,3gp,3g2,mj2"  # ISO base media files: the track header holds a display matrix
_MAX_BOXES = 4096  # boxes looked at in all when reading an mp4 header for its rotation; a real file has dozens
# demuxers that open things that are not videos: text (tty renders .txt as ANSI art) and still images
_NOT_VIDEO_DEMUXERS = {"tty", "image2", "image2pipe", "bin", "xbin", "adf", "idf"}
_STILL_DISPOSITIONS = ("attached_pic", "still_image", "timed_thumbnails")


def sample_indices(num_total: int, num_frames: int) -> list[int]:
    """Indices of `num_frames` frames spread evenly over `num_total`, first and last frame included.

    np.linspace(0, n - 1, k) rounded half up. Examples: (10, 4) -> [0, 3, 6, 9];
    (100, 1) -> [0]; more frames than the video has repeat: (3, 5) -> [0, 1, 1, 2, 2].
    """
    if num_total < 1:
        raise ValueError(f"cannot sample from a video with {num_total} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    positions = np.linspace(0, num_total - 1, num_frames)
    return np.floor(positions + 0.5).astype(int).tolist()


def scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """(width, height) with the longer side at most `max_side`, aspect kept; None if no scaling is needed.

    Example: scaled_size(3840, 2160, 448) -> (448, 252); scaled_size(320, 240, 448) -> None.
    """
    if max_side is None or max(width, height) <= max_side:
        return None
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# ---------------------------------------------------------------------------------------------- probe


def probe(path: str | os.PathLike, limits: VideoLimits = VideoLimits()) -> VideoMeta:
    """Header facts of the video at `path`; a VideoError subclass when it breaks a limit or is no video.

    Reads the container header and whatever FFmpeg needs to identify the streams (at most a frame or two,
    never one over limits.max_pixels); no RGB frame is made, so a small file declaring 16384x16384 costs
    next to nothing.
    """
    path = os.fspath(path)
    _check_size(path, limits)
    with _open(path, limits) as container:
        meta = _header_meta(container, _video_stream(container, path))
    _check_header(meta, limits, path)
    if meta.container == _ISO_CONTAINER:
        meta = dataclasses.replace(meta, rotation=display_rotation(path))
    return meta


def display_rotation(path: str | os.PathLike) -> int:
    """Counter-clockwise degrees (0, 90, 180 or 270) an mp4/mov video's frames are turned for display.

    The first video track's header matrix times the movie header's, and the angle FFmpeg's
    av_display_rotation_get takes from it (the value PyAV reports as ``VideoFrame.rotation``), rounded to
    a right angle; 0 for anything else: no such header, an angle that is not a right angle, a damaged box.
    Example: an iPhone portrait clip, stored 1920x1080 with the matrix (0, 1, -1, 0) -> 270 (turn it a
    quarter clockwise).
    """
    try:
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            budget = [_MAX_BOXES]   # shared by every level: a hostile header costs at most this many reads
            moov = _find_box(f, 0, end, b"moov", budget)
            if moov is None:
                return 0
            movie = (1.0, 0.0, 0.0, 1.0)
            for kind, start, stop in _boxes(f, moov[1], moov[2], budget):
                if kind == b"mvhd":
                    movie = _box_matrix(f, start, stop, (16, 28)) or movie
                elif kind == b"trak" and _track_handler(f, start, stop, budget) == b"vide":
                    tkhd = _find_box(f, start, stop, b"tkhd", budget)
                    track = _box_matrix(f, tkhd[1], tkhd[2], (20, 32)) if tkhd else None
                    return _right_angle(track, movie) if track else 0
    except (OSError, struct.error) as exc:
        log.warning("cannot read the track header of %s (%s); frames are taken as upright", path, exc)
    return 0


def _boxes(f: Any, start: int, end: int, budget: list[int]):
    """(type, payload start, box end) of the ISO boxes between start and end; stops at a malformed one, or
    when ``budget[0]`` (boxes left to read, shared with the caller's other loops) runs out."""
    pos = start
    while budget[0] > 0:
        budget[0] -= 1
        if pos + 8 > end:
            return
        f.seek(pos)
        header = f.read(8)
        if len(header) < 8:
            return
        size, kind = struct.unpack(">I4s", header)
        payload = pos + 8
        if size == 1:                       # 64-bit size follows
            large = f.read(8)
            if len(large) < 8:
                return
            size, payload = struct.unpack(">Q", large)[0], pos + 16
        elif size == 0:                     # to the end of the enclosing box
            size = end - pos
        if size < payload - pos or pos + size > end:
            return
        yield kind, payload, pos + size
        pos += size


def _find_box(f: Any, start: int, end: int, kind: bytes, budget: list[int]) -> tuple[bytes, int, int] | None:
    """The first box of type `kind` between start and end, as _boxes yields it; None if there is none."""
    return next((box for box in _boxes(f, start, end, budget) if box[0] == kind), None)


def _track_handler(f: Any, start: int, end: int, budget: list[int]) -> bytes | None:
    """A trak box's handler type (b"vide", b"soun", ...) from mdia/hdlr."""
    mdia = _find_box(f, start, end, b"mdia", budget)
    hdlr = _find_box(f, mdia[1], mdia[2], b"hdlr", budget) if mdia else None
    if hdlr is None or hdlr[2] - hdlr[1] < 12:
        return None
    f.seek(hdlr[1] + 8)   # version + flags, pre_defined
    return f.read(4)


def _box_matrix(f: Any, start: int, end: int, fields: tuple[int, int]) -> tuple[float, ...] | None:
    """(a, b, c, d) of a tkhd/mvhd matrix (16.16 fixed point); fields: bytes before it after version+flags
    in a version 0 / version 1 box (tkhd: 20 / 32, then 16 more; mvhd: 16 / 28, then 16 more)."""
    f.seek(start)
    version = f.read(1)
    if not version:
        return None
    offset = start + 4 + fields[1 if version[0] == 1 else 0] + 16
    if offset + 36 > end:
        return None
    f.seek(offset)
    m = struct.unpack(">9i", f.read(36))
    return m[0] / 65536, m[1] / 65536, m[3] / 65536, m[4] / 65536


def _right_angle(track: tuple[float, ...], movie: tuple[float, ...]) -> int:
    """FFmpeg's rotation of the matrix product (track x movie), as 0/90/180/270; 0 when not a right angle."""
    ta, tb, tc, td = track
    ma, mb, mc, md = movie
    a, b = ta * ma + tb * mc, ta * mb + tb * md
    c, d = tc * ma + td * mc, tc * mb + td * md
    scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)
    if not scale_x or not scale_y:
        return 0
    angle = -math.degrees(math.atan2(b / scale_y, a / scale_x))
    nearest = round(angle / 90) * 90
    if abs(angle - nearest) > 1.0:
        log.info("display matrix rotates by %.1f degrees, not a right angle; frames are left as stored", angle)
        return 0
    return nearest % 360


def upright(frames: np.ndarray, rotation: int) -> np.ndarray:
    """(T, H, W, 3) frames turned `rotation` degrees counter-clockwise (what a player shows).

    Example: rotation=90 turns a (T, 32, 64, 3) landscape clip into (T, 64, 32, 3), its right edge on top.
    """
    if rotation % 360 == 0:
        return frames
    return np.ascontiguousarray(np.rot90(frames, k=(rotation // 90) % 4, axes=(1, 2)))


def _check_size(path: str, limits: VideoLimits) -> None:
    size = os.path.getsize(path)  # a missing file is the caller's error: FileNotFoundError propagates
    if size == 0:
        raise NotAVideo(f"{path} is empty (0 bytes)")
    if size > limits.max_bytes:
        raise VideoTooLarge(f"{path} is {size / 2**20:.1f} MiB, over the {limits.max_bytes / 2**20:.0f} MiB "
                            "limit; upload a shorter or more compressed video")


def _open(path: str, limits: VideoLimits) -> Any:
    """av.open for reading, with FFmpeg's failures turned into NotAVideo.

    FFmpeg decodes a frame or two while it identifies the streams; max_pixels makes it refuse frames over
    the limit instead of allocating them (the stream then reports a 0x0 size, see _check_header).
    """
    try:
        # metadata_errors="replace": a damaged tag must not raise UnicodeDecodeError
        return av.open(path, metadata_errors="replace", options={"max_pixels": str(limits.max_pixels)})
    except av.FFmpegError as exc:
        raise NotAVideo(f"{path} could not be opened as a media container ({_reason(exc)}): it is no "
                        "video, or a badly damaged one (an .mp4 cut short before its index, the moov atom, "
                        "cannot be opened; upload the whole file)") from exc


def _reason(exc: BaseException) -> str:
    """FFmpeg's message without the file name PyAV appends."""
    return getattr(exc, "strerror", None) or str(exc)


def _video_stream(container: Any, path: str) -> Any:
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


# --------------------------------------------------------------------------------------------- sample


def sample_frames(path: str | os.PathLike, num_frames: int = 8, limits: VideoLimits = VideoLimits(),
                  backend: str = "auto", max_side: int | None = None) -> SampledFrames:
    """Decode `num_frames` frames evenly spaced over the whole video (see sample_indices).

    backend: "auto" picks decord where it is exact (module docstring) and PyAV otherwise or when decord
    fails; "decord" / "pyav" force one (benchmarks). max_side: the longer side of the returned frames
    is at most this, scaled inside the decoder, so a 4K upload never allocates full 4K RGB frames.
    Raises VideoTooLarge, ResolutionTooLarge, DurationTooLong, NotAVideo or CorruptVideo.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    path = os.fspath(path)
    meta = probe(path, limits)
    size = scaled_size(meta.width, meta.height, max_side)
    if meta.rotation and backend == "decord":
        raise ValueError(f"{path} has a display rotation of {meta.rotation} degrees: decord turns such frames "
                         "itself and garbles the ones it scales; use backend='auto' or 'pyav'")
    sample = _sample(path, meta, num_frames, limits, backend, size)
    sample.frames = upright(sample.frames, meta.rotation)
    return sample


def _sample(path: str, meta: VideoMeta, num_frames: int, limits: VideoLimits, backend: str,
            size: tuple[int, int] | None) -> SampledFrames:
    """sample_frames before the display rotation."""
    if backend == "decord":
        try:
            return _sample_decord(path, meta, meta.num_frames, num_frames, size)
        except ImportError:
            raise  # not installed: not the video's fault
        except Exception as exc:  # noqa: BLE001 - decord raises its own types
            raise CorruptVideo(f"{path}: decord could not decode the {meta.codec} stream "
                               f"({_decord_reason(exc)}); try backend='pyav'") from exc
    # One demux pass (a few ms) before any decoding: truncated and damaged files stop here, before decord
    # sees them, and PyAV gets its frame list.
    table = _read_packets(path, meta, limits)
    if backend == "auto" and _decord_suits(meta):
        try:
            return _sample_decord(path, meta, table.count, num_frames, size)
        except ImportError:
            log.info("decord is not installed; decoding %s with PyAV", path)
        except Exception as exc:  # noqa: BLE001 - decord raises its own types; any failure means "use PyAV"
            log.warning("decord failed on %s (%s); decoding with PyAV", path, _decord_reason(exc))
    return _sample_pyav(path, meta, table, num_frames, size, limits)


def _decord_suits(meta: VideoMeta) -> bool:
    """True where decord is known to return the requested frames (module docstring)."""
    if meta.num_frames <= 0 or meta.codec not in _DECORD_CODECS:
        return False  # undeclared frame count: PyAV counts packets; AV1 and others: decord cannot
    if meta.rotation:
        return False  # decord applies the display matrix itself, and scrambles rotated frames it scales
    if not meta.has_b_frames:
        return True
    if meta.codec not in _DECORD_REORDER_OK:
        return False
    containers = _DECORD_REORDER_OK[meta.codec]
    return containers is None or meta.container in containers


def _decord_reason(exc: BaseException) -> str:
    """First line of a decord error without its '[12:00:00] /src/file.cc:151: ' prefixes."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"\[[\d:]+\] \S+:\d+: ", "", line)[:300]


def _sample_decord(path: str, meta: VideoMeta, expected_frames: int, num_frames: int,
                   size: tuple[int, int] | None) -> SampledFrames:
    """decord's frames; RuntimeError when its frame list or output size is not what PyAV read (0: unknown)."""
    import decord  # here, not at the top: av must load first (module docstring)

    width, height = size or (meta.width, meta.height)
    reader = decord.VideoReader(path, ctx=decord.cpu(0), width=size[0] if size else -1,
                                height=size[1] if size else -1, num_threads=0)
    total = len(reader)
    if expected_frames and total != expected_frames:
        raise RuntimeError(f"decord counts {total} frames where PyAV reads {expected_frames}")
    indices = sample_indices(total, num_frames)
    frames = reader.get_batch(indices).asnumpy()  # (T, H, W, 3) uint8
    if frames.shape[1:] != (height, width, 3):
        raise RuntimeError(f"decord returned frames of {frames.shape[1:]}, not ({height}, {width}, 3)")
    starts = reader.get_frame_timestamp([0, *indices])[:, 0]  # (T + 1,) start time of each frame, seconds
    timestamps = [round(float(t - starts[0]), 6) for t in starts[1:]]
    fps = float(reader.get_avg_fps()) or meta.fps
    counted = dataclasses.replace(meta, num_frames=total, fps=fps,
                                  duration_s=meta.duration_s or (total / fps if fps else 0.0))
    return SampledFrames(frames=frames, indices=indices, timestamps_s=timestamps, meta=counted,
                         backend="decord")


# ----------------------------------------------------------------------------------------------- PyAV


@dataclass
class _PacketTable:
    """What one demux pass (no decoding) learns about the video stream's frames."""

    pts: list[int]              # presentation time of every frame, ascending: pts[i] is frame i
    keyframes: list[int]        # pts of the keyframes, ascending: where decoding can start
    seek_to: dict[int, int]     # keyframe pts -> timestamp to seek to (its dts: the mp4 index is in dts)
    pts_reliable: bool          # every packet had a distinct pts (else frames are counted in decode order)
    count: int                  # frames (packets with data), equal to len(pts) when pts_reliable
    fps: float                  # frames per second of the pts span, for headers without a frame rate


def _read_packets(path: str, meta: VideoMeta, limits: VideoLimits) -> _PacketTable:
    """The packet table of the video at `path`; CorruptVideo when frames are missing."""
    with _open(path, limits) as container:
        table = _packet_table(container, _video_stream(container, path), meta, limits, path)
    declared = meta.num_frames
    if table.count == 0:
        raise CorruptVideo(f"{path}: the {meta.codec} stream has no frames that can be read")
    if declared and table.count < declared - max(1, declared // 100):
        raise CorruptVideo(f"{path} declares {declared} frames but only {table.count} can be read: the file "
                           "is truncated or damaged (an incomplete upload?)")
    return table


def _sample_pyav(path: str, meta: VideoMeta, table: _PacketTable, num_frames: int,
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
        with _open(path, limits) as container:
            stream = _video_stream(container, path)
            decoded = _decode_by_seeking(container, stream, table, wanted, size, limits)
    if decoded is None:
        with _open(path, limits) as container:
            stream = _video_stream(container, path)
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
        raise CorruptVideo(f"{path}: reading packet {count} failed ({_reason(exc)}); "
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
            errors.append(_reason(exc))


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
        log.warning("PyAV: seek/decode failed (%s); decoding in order instead", _reason(exc))
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
        errors.append(_reason(exc))
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
