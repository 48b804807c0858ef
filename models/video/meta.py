"""What a video is and what sampling gives back: upload limits, header facts, sampled frames, and the
pure arithmetic of which frames to take and at what size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
