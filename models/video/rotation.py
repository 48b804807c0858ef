"""Display rotation: read an mp4/mov file's display matrix from its header and turn frames upright.

Phones store a portrait video as landscape frames plus a display matrix in the mp4/mov track header.
``display_rotation`` reads it from the file (a few header reads, no decoding, the same matrix product and
angle FFmpeg computes) and both backends return frames turned upright (``upright``), so the captioner and
the scorer see what a player shows. Right angles only (a mirror or a skew in the matrix is ignored); other
containers are taken as upright (their rotation tags are rare).
"""

from __future__ import annotations

import logging
import math
import os
import struct
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ISO_CONTAINER = "mov,mp4,m4a,3gp,3g2,mj2"  # ISO base media files: the track header holds a display matrix
_MAX_BOXES = 4096  # boxes looked at in all when reading an mp4 header for its rotation; a real file has dozens


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
