"""Write small synthetic test videos with PyAV (no ffmpeg binary needed).

Every frame carries its own frame number as a 4x4 grid of black/white cells holding the number's
Gray code (bit 0 at the top left, row-major, white = 1), so a test can check which frame a sampler
really returned:

    make_video("clip.mp4", num_frames=48)         # frame 5 -> Gray 0b111 -> cells 0, 1, 2 white
    read_index(frames[i]) == reported_index[i]

Cells cover the whole frame, so the code survives lossy codecs, chroma subsampling and downscaling
(read_index looks only at the middle of each cell). Gray code changes one cell per frame, which
inter-frame codecs at low quality reproduce far better than binary's flickering low bits (SVT-AV1
at 720p garbled most binary-coded frames). 16 bits: indices up to 65535.
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

GRID = 4  # cells per side; GRID * GRID bits of frame index
BITS = GRID * GRID
BLACK, WHITE = 16, 235  # video-range luma, so limited-range conversions do not clip

# codec name given by the caller -> (encoder to use, default container suffix)
_AV1_ENCODERS = ("libsvtav1", "libaom-av1", "librav1e")
_DEFAULT_SUFFIX = {
    "libx264": "mp4",
    "libx265": "mp4",
    "mpeg4": "avi",
    "libvpx": "webm",
    "libvpx-vp9": "webm",
    "av1": "mkv",
}
# encoder options that keep the test videos fast to write
_FAST_OPTIONS = {
    "libx264": {"preset": "ultrafast"},
    "libx265": {"preset": "ultrafast", "x265-params": "log-level=error"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"},
    "libsvtav1": {"preset": "8"},  # presets 10-12 garble the drawn cells (SVT warns of artifacts)
    "libaom-av1": {"cpu-used": "8", "usage": "realtime"},
}


def av1_encoder() -> str | None:
    """Name of an AV1 encoder this PyAV build has, or None."""
    return next((name for name in _AV1_ENCODERS if name in av.codecs_available), None)


def draw_index(index: int, size: tuple[int, int]) -> np.ndarray:
    """RGB frame (H, W, 3) uint8 of `size` = (width, height) showing `index` as a GRID x GRID bit grid.

    Example: draw_index(5, (96, 64)) -> cells 0, 1 and 2 of row 0 white (Gray code of 5 = 0b111).
    """
    if not 0 <= index < 2**BITS:
        raise ValueError(f"frame index {index} does not fit in {BITS} bits")
    width, height = size
    gray = index ^ (index >> 1)
    bits = (gray >> np.arange(BITS)) & 1  # (BITS,) LSB first
    cells = np.where(bits.reshape(GRID, GRID) == 1, WHITE, BLACK).astype(np.uint8)  # (GRID, GRID)
    rows = np.arange(height) * GRID // height  # (H,) cell row of each pixel row
    cols = np.arange(width) * GRID // width  # (W,)
    luma = cells[rows[:, None], cols[None, :]]  # (H, W)
    return np.repeat(luma[:, :, None], 3, axis=2)


_draw = draw_index  # inside make_video its draw_index flag shadows this function


def read_index(frame: np.ndarray) -> int:
    """Frame number drawn by draw_index, read from an RGB (H, W, 3) frame of any size.

    Example: read_index(draw_index(5, (96, 64))) -> 5
    """
    height, width = frame.shape[:2]
    luma = frame.astype(np.float32).mean(axis=2)  # (H, W)
    code = 0
    for bit in range(BITS):
        row, col = divmod(bit, GRID)
        # the middle half of each cell, away from blurred or ringing edges
        y0, y1 = (4 * row + 1) * height // (4 * GRID), (4 * row + 3) * height // (4 * GRID)
        x0, x1 = (4 * col + 1) * width // (4 * GRID), (4 * col + 3) * width // (4 * GRID)
        if luma[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)].mean() > (BLACK + WHITE) / 2:
            code |= 1 << bit
    index, shift = code, code >> 1  # Gray -> binary: XOR of all right shifts
    while shift:
        index ^= shift
        shift >>= 1
    return index


def make_video(
    path: str | os.PathLike,
    codec: str = "libx264",
    container: str | None = None,
    num_frames: int = 48,
    fps: int = 24,
    size: tuple[int, int] = (96, 64),
    draw_index: bool = True,
    gop_size: int | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    rotation: float | None = None,
) -> str:
    """Encode `num_frames` frames of `size` = (width, height) at `fps` and return the path written.

    codec: an encoder name (libx264, libx265, mpeg4, libvpx, libvpx-vp9, libsvtav1, ...) or "av1" for
    whichever AV1 encoder exists. container: the file suffix to use ("mp4", "avi", "webm", "mkv");
    None keeps the suffix of `path`, or picks the codec's usual one when `path` has none.
    gop_size: frames between keyframes (None: the encoder's default). options: encoder options, replacing
    the fast defaults (e.g. {"preset": "medium"} for libx264 with B-frames; ultrafast has none).
    container_options: muxer options, e.g. {"movflags": "+faststart"} to put the mp4 index first.
    draw_index=False draws a moving gradient instead of the frame number (content for benchmarks).
    rotation: a display rotation in counter-clockwise degrees written to the container (mp4/mov: the
    track header matrix), as a phone does for a portrait clip; the coded frames are the same.
    """
    encoder = av1_encoder() if codec == "av1" else codec
    if encoder is None or encoder not in av.codecs_available:
        raise RuntimeError(f"PyAV has no {codec!r} encoder here; available AV1: {av1_encoder()}")
    path = os.fspath(path)
    stem, suffix = os.path.splitext(path)
    if container is not None:
        path = f"{stem}.{container}"
    elif not suffix:
        path = f"{stem}.{_DEFAULT_SUFFIX.get('av1' if encoder in _AV1_ENCODERS else encoder, 'mkv')}"
    width, height = size
    if encoder == "libsvtav1":
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole config to stderr otherwise

    with av.open(path, mode="w", options=container_options or {}) as out:
        opts = _FAST_OPTIONS.get(encoder, {}) if options is None else options
        stream = out.add_stream(encoder, rate=Fraction(fps), options=opts)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        if gop_size is not None:
            stream.codec_context.gop_size = gop_size
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(num_frames):
            rgb = _draw(i, size) if draw_index else _gradient(i, size)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def _gradient(index: int, size: tuple[int, int]) -> np.ndarray:
    """RGB (H, W, 3) frame with a diagonal gradient that moves one pixel per frame."""
    width, height = size
    ramp = (np.arange(width)[None, :] + np.arange(height)[:, None] + index) % 256  # (H, W)
    return np.stack([ramp, 255 - ramp, (ramp * 2) % 256], axis=2).astype(np.uint8)
