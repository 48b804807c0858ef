"""What the stress run uploads: seed videos in four containers, decompression bombs, non-videos, and
the mutations that turn seeds into fuzz cases.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

# ------------------------------------------------------------------------------------------ videos


def make_seeds(out: Path) -> list[tuple[str, bytes]]:
    """Small valid videos in the four container/codec pairs, a few shapes each: (label, bytes)."""
    from videomaker import av1_encoder, make_video

    out.mkdir(parents=True, exist_ok=True)
    pairs = [("h264-mp4", "libx264", "mp4"), ("mpeg4-avi", "mpeg4", "avi"),
             ("vp9-webm", "libvpx-vp9", "webm")]
    if av1_encoder():
        pairs.append(("av1-mkv", "av1", "mkv"))
    seeds = []
    for label, codec, container in pairs:
        for i, (frames, size, gop) in enumerate([(24, (64, 48), None), (36, (96, 64), 6)]):
            path = make_video(out / f"seed-{label}-{i}", codec=codec, container=container, num_frames=frames,
                              size=size, gop_size=gop)
            seeds.append((f"{label}-{i}", Path(path).read_bytes()))
    # moov first (faststart): its header then lies in the first 1 KB, where header corruption aims
    path = make_video(out / "seed-h264-faststart", num_frames=24, size=(64, 48), container="mp4",
                      container_options={"movflags": "+faststart"})
    seeds.append(("h264-mp4-faststart", Path(path).read_bytes()))
    return seeds


def make_clips(out: Path, n: int, offset: int = 0) -> list[bytes]:
    """n distinct small H.264 clips (distinct frame counts): valid uploads for load and kill phases."""
    from videomaker import make_video

    out.mkdir(parents=True, exist_ok=True)
    return [Path(make_video(out / f"clip-{offset + i}.mp4", num_frames=10 + offset + i, size=(64, 48)))
            .read_bytes() for i in range(n)]


def _patch_vp9_frame_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame size in each VP9 profile-0 keyframe header (from bit 36: width-1, height-1; 16 bits).

    Example: a 64x48 webm -> the same file whose keyframes declare 16384x16384 (Matroska's own
    PixelWidth/PixelHeight are left alone: decoders believe the bitstream).
    """
    out = bytearray(data)
    at = 0
    while (at := out.find(b"\x49\x83\x42", at + 1)) > 0:   # the keyframe sync code follows the first byte
        start = at - 1
        if out[start] >> 6 != 2:        # frame_marker
            continue
        bits = int.from_bytes(out[start:start + 9], "big")   # 72 bits: frame size ends at bit 68
        for value, offset in ((width - 1, 36), (height - 1, 52)):
            shift = 72 - offset - 16
            bits = (bits & ~(0xFFFF << shift)) | ((value & 0xFFFF) << shift)
        out[start:start + 9] = bits.to_bytes(9, "big")
    return bytes(out)


def _patch_avi(data: bytes, width: int | None = None, height: int | None = None,
               frames: int | None = None) -> bytes:
    """Rewrite an AVI's declared size (avih, strf and every JPEG SOF0) or frame count (avih, strh)."""
    out = bytearray(data)
    avih, strh, strf = out.find(b"avih") + 8, out.find(b"strh") + 8, out.find(b"strf") + 8
    if frames is not None:
        out[avih + 16:avih + 20] = frames.to_bytes(4, "little")     # dwTotalFrames
        out[strh + 32:strh + 36] = frames.to_bytes(4, "little")     # dwLength
    if width is not None and height is not None:
        out[avih + 32:avih + 40] = width.to_bytes(4, "little") + height.to_bytes(4, "little")
        out[strf + 4:strf + 12] = width.to_bytes(4, "little") + height.to_bytes(4, "little")
        at = 0
        while (at := out.find(b"\xff\xc0", at + 1)) > 0:          # SOF0: FFC0 len(2) precision(1) H(2) W(2)
            out[at + 5:at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(out)


def _patch_mp4_timescale(data: bytes, timescale: int) -> bytes:
    """Rewrite every mvhd/mdhd timescale: the same frames then declare a far longer duration."""
    out = bytearray(data)
    for box in (b"mvhd", b"mdhd"):
        at = 0
        while (at := out.find(box, at + 1)) > 0:
            offset = at + 8 + (16 if out[at + 4] == 1 else 8)   # after version/flags and the two dates
            out[offset:offset + 4] = timescale.to_bytes(4, "big")
    return bytes(out)


def make_bombs(out: Path) -> list[tuple[str, bytes]]:
    """Small files that declare a huge frame size, duration or frame count: each must answer 413."""
    import av
    import numpy as np
    from videomaker import make_video

    out.mkdir(parents=True, exist_ok=True)
    vp9 = Path(make_video(out / "bomb-base", codec="libvpx-vp9", container="webm", num_frames=8,
                          size=(64, 48))).read_bytes()
    mjpeg_path = out / "bomb-base-mjpeg.avi"
    with av.open(str(mjpeg_path), "w") as container:
        stream = container.add_stream("mjpeg", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    mjpeg = mjpeg_path.read_bytes()
    mp4 = Path(make_video(out / "bomb-base.mp4", num_frames=24, size=(64, 48))).read_bytes()
    avi = Path(make_video(out / "bomb-base.avi", codec="mpeg4", num_frames=24, size=(64, 48))).read_bytes()
    # a real video one notch over max_pixels (3856 x 2160 > 3840 x 2160): flat frames, a few kB
    over = Path(make_video(out / "bomb-over-4k.mp4", num_frames=2, size=(3856, 2160), draw_index=False))
    return [("bomb vp9 declares 16384x16384", _patch_vp9_frame_size(vp9, 16384, 16384)),
            ("bomb vp9 declares 3841x2160 (max_pixels + 1 column)", _patch_vp9_frame_size(vp9, 3841, 2160)),
            ("bomb mjpeg/avi declares 16384x16384", _patch_avi(mjpeg, 16384, 16384)),
            ("bomb h264 3856x2160 (real, over max_pixels)", over.read_bytes()),
            ("bomb mp4 declares 1000 s (timescale 1)", _patch_mp4_timescale(mp4, 1)),
            ("bomb avi declares 50M frames", _patch_avi(avi, frames=50_000_000))]


def make_non_videos(rng: random.Random) -> list[tuple[str, bytes, set[int] | None]]:
    """Things that are not videos: (label, bytes, allowed statuses; None = any documented one)."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.frombuffer(rng.randbytes(64 * 48 * 3), np.uint8).reshape(48, 64, 3))
    encoded = {}
    for fmt in ("PNG", "JPEG", "BMP", "WEBP"):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        encoded[fmt] = buffer.getvalue()
    gif = io.BytesIO()
    image.save(gif, format="GIF", save_all=True, append_images=[image.rotate(90), image.rotate(180)])
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("clip.mp4", rng.randbytes(2048))
    refused = {400, 415, 422}
    return [("empty file", b"", {400}),
            ("text", b"this is not a video\n" * 200, refused),
            ("json", json.dumps({"video": "clip.mp4"}).encode() * 20, refused),
            ("html", b"<!doctype html><html><body><video src=x></video></body></html>" * 20, refused),
            ("png", encoded["PNG"], refused), ("jpeg", encoded["JPEG"], refused),
            ("bmp", encoded["BMP"], refused), ("webp", encoded["WEBP"], refused),
            ("animated gif", gif.getvalue(), None),   # FFmpeg reads GIF as video: 200 is fine too
            ("zip", archive.getvalue(), refused),
            ("random bytes 4 KB", rng.randbytes(4096), refused),
            ("random bytes 1 MB", rng.randbytes(2**20), refused),
            ("one byte", b"\0", refused),
            ("elf header", b"\x7fELF\x02\x01\x01" + bytes(57) + rng.randbytes(512), refused),
            ("pdf", b"%PDF-1.7\n" + rng.randbytes(1024), refused)]


# --------------------------------------------------------------------------------------- mutations


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 32)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(1, len(data))]


def splice_garbage(data: bytes, rng: random.Random) -> bytes:
    at, junk = rng.randrange(len(data)), rng.randbytes(rng.randint(1, 2048))
    replace = rng.randint(0, len(junk)) if rng.random() < 0.5 else 0   # insert, or overwrite
    return data[:at] + junk + data[at + replace:]


# container structure worth hitting: mp4 boxes, EBML/Matroska element ids, RIFF/AVI chunks
HEADER_MARKERS = (b"ftyp", b"moov", b"mvhd", b"trak", b"tkhd", b"mdhd", b"stsd", b"avcC", b"stts", b"stss",
                  b"stsz", b"stco", b"stsc", b"ctts", b"elst", b"\x1a\x45\xdf\xa3", b"\x18\x53\x80\x67",
                  b"\x16\x54\xae\x6b", b"\x1f\x43\xb6\x75", b"\x1c\x53\xbb\x6b", b"\xa3", b"RIFF", b"hdrl",
                  b"avih", b"strh", b"strf", b"LIST", b"movi", b"idx1")


def corrupt_header(data: bytes, rng: random.Random) -> bytes:
    """Overwrite a few bytes next to a container header marker, or anywhere in the first 1 KB."""
    out = bytearray(data)
    found = [at for marker in HEADER_MARKERS if (at := data.find(marker)) >= 0]
    if found and rng.random() < 0.7:
        at = rng.choice(found)
        lo, hi = max(0, at - 4), min(len(out), at + 48)   # the size field before an mp4 box type, too
    else:
        lo, hi = 0, min(len(out), 1024)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(lo, hi)] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x01, rng.randrange(256)])
    return bytes(out)


def corrupt_size_field(data: bytes, rng: random.Random) -> bytes:
    """Set a box/chunk size field to 0, 1, huge or off by a little (mp4: before the type; RIFF: after it)."""
    out = bytearray(data)
    spots = [(at - 4 if marker[:1].islower() else at + 4)
             for marker in (b"moov", b"trak", b"mdat", b"stsz", b"stco", b"RIFF", b"LIST", b"movi", b"idx1")
             if (at := data.find(marker)) >= 4]
    if not spots:
        return flip_bits(data, rng)
    at = rng.choice(spots)
    near = int.from_bytes(out[at:at + 4], "big") + rng.randint(-16, 16)
    value = rng.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, near])
    out[at:at + 4] = (value % 2**32).to_bytes(4, "big")
    return bytes(out)


def duplicate_chunk(data: bytes, rng: random.Random) -> bytes:
    n = rng.randint(1, max(1, len(data) // 4))
    src, dst = rng.randrange(len(data) - n + 1), rng.randrange(len(data))
    return data[:dst] + data[src:src + n] + data[dst:]


def zero_chunk(data: bytes, rng: random.Random) -> bytes:
    n = rng.randint(1, max(1, len(data) // 4))
    at = rng.randrange(len(data) - n + 1)
    return data[:at] + bytes(n) + data[at + n:]


MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "bit flips": flip_bits, "truncation": truncate, "spliced garbage": splice_garbage,
    "header corruption": corrupt_header, "size field": corrupt_size_field,
    "duplicated chunk": duplicate_chunk, "zeroed chunk": zero_chunk}
# the client's filename: never used as a path by the server, whatever it says
FILENAMES = ["clip.mp4", "../../etc/passwd", "/etc/shadow", "..\\..\\boot.ini", "a" * 4000, "ü 視頻.mkv",
             "", "clip.mp4\x00.exe", "%2e%2e%2fescape.avi", "$(reboot).webm"]
