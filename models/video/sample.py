"""``sample_frames``: probe, pick a backend, decode, turn upright. The one entry point callers use.

Backends: decord where it is exact (decord_backend.py), PyAV for everything else and whenever decord
fails (pyav_backend.py). decord can still abort the process on some damaged file, which is why the server
calls this in a worker process.
"""

from __future__ import annotations

import logging
import os

from capguard.models.video.decord_backend import decord_reason, decord_suits, sample_decord
from capguard.models.video.errors import CorruptVideo
from capguard.models.video.meta import SampledFrames, VideoLimits, VideoMeta, scaled_size
from capguard.models.video.probe import probe
from capguard.models.video.pyav_backend import read_packets, sample_pyav
from capguard.models.video.rotation import upright

log = logging.getLogger(__name__)

BACKENDS = ("auto", "decord", "pyav")


def sample_frames(path: str | os.PathLike, num_frames: int = 8, limits: VideoLimits = VideoLimits(),
                  backend: str = "auto", max_side: int | None = None) -> SampledFrames:
    """Decode `num_frames` frames evenly spaced over the whole video (see sample_indices).

    backend: "auto" picks decord where it is exact (decord_backend.py) and PyAV otherwise or when decord
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
            return sample_decord(path, meta, meta.num_frames, num_frames, size)
        except ImportError:
            raise  # not installed: not the video's fault
        except Exception as exc:  # noqa: BLE001 - decord raises its own types
            raise CorruptVideo(f"{path}: decord could not decode the {meta.codec} stream "
                               f"({decord_reason(exc)}); try backend='pyav'") from exc
    # One demux pass (a few ms) before any decoding: truncated and damaged files stop here, before decord
    # sees them, and PyAV gets its frame list.
    table = read_packets(path, meta, limits)
    if backend == "auto" and decord_suits(meta):
        try:
            return sample_decord(path, meta, table.count, num_frames, size)
        except ImportError:
            log.info("decord is not installed; decoding %s with PyAV", path)
        except Exception as exc:  # noqa: BLE001 - decord raises its own types; any failure means "use PyAV"
            log.warning("decord failed on %s (%s); decoding with PyAV", path, decord_reason(exc))
    return sample_pyav(path, meta, table, num_frames, size, limits)
