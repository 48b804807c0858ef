"""Frame sampling: read a video file's header, enforce upload limits, decode a few evenly spaced frames.

    meta = probe("clip.mp4")                        # header only; raises before any frame is decoded
    sample = sample_frames("clip.mp4", num_frames=8, max_side=448)
    sample.frames.shape                             # (8, H, W, 3) uint8 RGB
    sample.indices, sample.timestamps_s             # which frames, and when they are shown

Frame index i is the i-th frame in presentation order; timestamps are presentation times relative
to the first frame. Both backends are checked against this definition by tests/test_video.py.

The package, one concern per module:
- errors.py: VideoError and its subclasses, each with a stable ``code`` (the server maps it to HTTP);
- meta.py: VideoLimits, VideoMeta, SampledFrames, and which frames to take (``sample_indices``) at what
  size (``scaled_size``);
- probe.py: the header alone (``probe``), limits enforced before any frame is decoded;
- rotation.py: the mp4/mov display matrix (``display_rotation``) and ``upright``;
- decord_backend.py / pyav_backend.py: the two decoders and where each is exact;
- sample.py: ``sample_frames``, the entry point (the server's decoder setting names
  ``capguard.models.video:sample_frames``).

av is imported here, before anything can import decord: decord's bundled libvpx, loaded first, breaks
PyAV's VP8/VP9 encoding (decord_backend.py).
"""

import av  # noqa: F401 - first, before decord (see above)

from capguard.models.video.errors import (
    CorruptVideo,
    DurationTooLong,
    NotAVideo,
    ResolutionTooLarge,
    VideoError,
    VideoTooLarge,
)
from capguard.models.video.meta import SampledFrames, VideoLimits, VideoMeta, sample_indices, scaled_size
from capguard.models.video.probe import probe
from capguard.models.video.rotation import display_rotation, upright
from capguard.models.video.sample import BACKENDS, sample_frames

__all__ = [
    "BACKENDS", "CorruptVideo", "DurationTooLong", "NotAVideo", "ResolutionTooLarge", "SampledFrames",
    "VideoError", "VideoLimits", "VideoMeta", "VideoTooLarge", "display_rotation", "probe", "sample_frames",
    "sample_indices", "scaled_size", "upright",
]
