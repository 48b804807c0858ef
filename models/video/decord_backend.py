"""The decord path: fast C++ random access, used only where it returns the frame it is asked for.

Measured with decord 0.6.0 here: it returns wrong frames for HEVC, for MPEG-4 Part 2 with B-frames and
for H.264 with B-frames in AVI (AVI stores no presentation times), cannot open AV1, and fails on some
output widths (48, 72, ...). It turns rotated frames itself but scrambles the ones it also scales, so
rotated videos go to PyAV. Decord is only ever given a file path, never bytes: with bytes it segfaults on
some damaged files.

Shared libraries: decord bundles an old FFmpeg and libvpx and loads them with RTLD_GLOBAL; imported before
PyAV, its libvpx shadows PyAV's and VP8/VP9 *encoding* fails. So decord is imported only inside
``sample_decord``, after the package has imported av.
"""

from __future__ import annotations

import dataclasses
import re

from capguard.models.video.meta import SampledFrames, VideoMeta, sample_indices

# codec -> containers in which decord returns exact frames even with B-frames (see module docstring);
# without B-frames these codecs are exact in any container decord opens.
_DECORD_CODECS = {"h264", "hevc", "mpeg4", "vp8", "vp9"}
_DECORD_REORDER_OK = {"h264": ("mov,mp4,m4a,3gp,3g2,mj2",), "vp8": None, "vp9": None}  # None: any container


def decord_suits(meta: VideoMeta) -> bool:
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


def decord_reason(exc: BaseException) -> str:
    """First line of a decord error without its '[12:00:00] /src/file.cc:151: ' prefixes."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"\[[\d:]+\] \S+:\d+: ", "", line)[:300]


def sample_decord(path: str, meta: VideoMeta, expected_frames: int, num_frames: int,
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
