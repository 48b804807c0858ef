"""Frame sampling (the models/video/ package) on real encoded videos whose frames carry their own index.

Every video here is written by bench/videomaker.py, which draws each frame's number into it, so a
test can check that the frame a backend returns is the frame it claims (read_index == index).
Damaged files never reach decord in this process (it can abort the interpreter): they run with
backend="pyav" here, or with backend="auto" in a spawned subprocess.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import os
import tracemalloc
from concurrent.futures import ProcessPoolExecutor

import av  # before anything that may load decord: see the models/video/ package docstring
import numpy as np
import pytest
from PIL import Image
from videomaker import av1_encoder, draw_index, make_video, read_index

from capguard.models import video
from capguard.models.video import (
    CorruptVideo,
    DurationTooLong,
    NotAVideo,
    ResolutionTooLarge,
    VideoLimits,
    VideoTooLarge,
    probe,
    pyav_backend,
    sample_frames,
    sample_indices,
    scaled_size,
)

HAS_DECORD = importlib.util.find_spec("decord") is not None
AV1 = av1_encoder()
needs_decord = pytest.mark.skipif(not HAS_DECORD, reason="decord is not installed (x86_64 only)")
needs_av1 = pytest.mark.skipif(AV1 is None, reason="this PyAV build has no AV1 encoder")

FPS = 24
N = 48  # frames per test video: 2 s at 24 fps

# name -> (make_video kwargs, backend that "auto" must pick)
VIDEOS = {
    # preset medium: B-frames, so presentation order differs from decode order
    "h264.mp4": (dict(codec="libx264", options={"preset": "medium"}, gop_size=12), "decord"),
    "mpeg4.avi": (dict(codec="mpeg4", gop_size=12), "decord"),
    "vp9.webm": (dict(codec="libvpx-vp9", gop_size=12), "pyav"),          # webm declares 0 frames
    "h264.mkv": (dict(codec="libx264", options={"preset": "medium"}, gop_size=12), "pyav"),  # ditto
    "av1.mkv": (dict(codec="av1", gop_size=12), "pyav"),                  # decord cannot read AV1
    "av1.mp4": (dict(codec="av1", gop_size=12), "pyav"),                  # even with a frame count
    # decord misplaces frames here (AVI has no presentation times; HEVC seeks), so auto uses PyAV
    "h264-bframes.avi": (dict(codec="libx264", options={"preset": "medium"}, gop_size=12), "pyav"),
    "hevc.mp4": (dict(codec="libx265", options={"preset": "ultrafast", "x265-params": "log-level=error"},
                      gop_size=12), "pyav"),
    "hevc-no-bframes.mp4": (dict(codec="libx265", gop_size=12,
                                 options={"preset": "ultrafast", "x265-params": "bframes=0:log-level=error"}),
                            "decord"),
}
# forced decord is checked only where it is exact (the cases auto hands to it, plus webm/mkv)
DECORD_EXACT = ["h264.mp4", "mpeg4.avi", "vp9.webm", "h264.mkv"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("videos")
    made = {}
    for name, (kwargs, _) in VIDEOS.items():
        if kwargs["codec"] == "av1" and AV1 is None:
            continue
        made[name] = make_video(directory / name, num_frames=N, fps=FPS, **kwargs)
    return made


def _check_exact(sample, num_frames: int, total: int = N, fps: float = FPS) -> None:
    """Indices are the linspace sample, each frame shows its index, timestamps are index / fps."""
    assert sample.indices == sample_indices(total, num_frames)
    assert sample.frames.dtype == np.uint8 and sample.frames.shape[0] == num_frames
    assert [read_index(f) for f in sample.frames] == sample.indices
    assert sample.timestamps_s == pytest.approx([i / fps for i in sample.indices], abs=1e-3)
    assert sample.meta.num_frames == total


# ------------------------------------------------------------------------------------------ helpers


@pytest.mark.parametrize("total, k, expected", [
    (10, 4, [0, 3, 6, 9]),
    (100, 1, [0]),
    (48, 8, [0, 7, 13, 20, 27, 34, 40, 47]),
    (3, 5, [0, 1, 1, 2, 2]),       # more frames asked than exist: repeats, still in order
    (1, 3, [0, 0, 0]),
])
def test_sample_indices_examples(total, k, expected):
    assert sample_indices(total, k) == expected


def test_sample_indices_spans_whole_video_in_order():
    for total in (1, 2, 7, 48, 1001):
        for k in (1, 2, 8, 33):
            got = sample_indices(total, k)
            assert len(got) == k and got[0] == 0 and got == sorted(got)
            assert got[-1] == (total - 1 if k > 1 else 0)
            assert got == [int(np.floor(x + 0.5)) for x in np.linspace(0, total - 1, k)]


@pytest.mark.parametrize("total, k", [(0, 8), (10, 0), (-1, 3)])
def test_sample_indices_rejects_empty(total, k):
    with pytest.raises(ValueError):
        sample_indices(total, k)


def test_scaled_size():
    assert scaled_size(3840, 2160, 448) == (448, 252)
    assert scaled_size(1080, 1920, 448) == (252, 448)   # portrait: the longer side is the height
    assert scaled_size(320, 240, 448) is None           # never upscale
    assert scaled_size(320, 240, None) is None


def test_videomaker_index_round_trip():
    for i in (0, 1, 5, 47, 1000, 65535):
        assert read_index(draw_index(i, (96, 64))) == i
        assert read_index(draw_index(i, (1280, 720))[::9, ::9]) == i   # survives downscaling


# ----------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", list(VIDEOS))
@pytest.mark.parametrize("k", [8, 5])
def test_auto_returns_exact_frames(videos, name, k):
    if name not in videos:
        pytest.skip("no AV1 encoder")
    sample = sample_frames(videos[name], num_frames=k)
    _check_exact(sample, k)
    expected_backend = VIDEOS[name][1] if HAS_DECORD else "pyav"
    assert sample.backend == expected_backend
    assert sample.meta.fps == pytest.approx(FPS)


@pytest.mark.parametrize("name", list(VIDEOS))
def test_pyav_returns_exact_frames(videos, name):
    if name not in videos:
        pytest.skip("no AV1 encoder")
    sample = sample_frames(videos[name], num_frames=8, backend="pyav")
    assert sample.backend == "pyav"
    _check_exact(sample, 8)


@needs_decord
@pytest.mark.parametrize("name", DECORD_EXACT)
def test_decord_returns_exact_frames(videos, name):
    sample = sample_frames(videos[name], num_frames=8, backend="decord")
    assert sample.backend == "decord"
    _check_exact(sample, 8)


@needs_decord
@needs_av1
def test_av1_forced_decord_fails_cleanly_and_auto_uses_pyav(videos):
    with pytest.raises(CorruptVideo, match="decord could not decode the av1 stream"):
        sample_frames(videos["av1.mp4"], backend="decord")
    assert sample_frames(videos["av1.mp4"]).backend == "pyav"


def test_webm_without_frame_count_is_counted(videos):
    assert probe(videos["vp9.webm"]).num_frames == 0      # matroska/webm headers carry no frame count
    sample = sample_frames(videos["vp9.webm"], num_frames=8)
    assert sample.meta.num_frames == N
    assert sample.meta.duration_s == pytest.approx(N / FPS, abs=0.05)


@pytest.mark.parametrize("backend", ["auto", "pyav", pytest.param("decord", marks=needs_decord)])
def test_more_frames_than_the_video_has(tmp_path, backend):
    path = make_video(tmp_path / "five.mp4", num_frames=5, fps=FPS)
    sample = sample_frames(path, num_frames=8, backend=backend)
    assert sample.indices == [0, 1, 1, 2, 2, 3, 3, 4]
    _check_exact(sample, 8, total=5)


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_pyav_seeks_exactly_in_a_long_video(tmp_path, caplog, container):
    """300 frames, a keyframe every 30 and B-frames: 16 samples land in most GOPs, no fallback."""
    path = make_video(tmp_path / f"long.{container}", num_frames=300, fps=30, gop_size=30,
                      options={"preset": "medium"})
    with caplog.at_level(logging.WARNING, logger="capguard.models.video"):
        sample = sample_frames(path, num_frames=16, backend="pyav")
    _check_exact(sample, 16, total=300, fps=30)
    assert not caplog.records, "seeking fell back to decoding in order"


def test_in_order_decoding_is_exact_too(videos, monkeypatch):
    """The fallback path (containers without trusted pts) on a B-frame stream."""
    monkeypatch.setattr(pyav_backend, "_PTS_CONTAINERS", set())
    _check_exact(sample_frames(videos["h264.mp4"], num_frames=8, backend="pyav"), 8)


@pytest.mark.parametrize("backend", ["auto", "pyav", pytest.param("decord", marks=needs_decord)])
def test_max_side_downscales_in_the_decoder(tmp_path, backend):
    path = make_video(tmp_path / "vga.mp4", num_frames=12, size=(320, 240), fps=FPS)
    sample = sample_frames(path, num_frames=4, backend=backend, max_side=100)
    assert sample.frames.shape == (4, 75, 100, 3)
    assert sample.meta.width == 320 and sample.meta.height == 240   # meta keeps the source size
    assert [read_index(f) for f in sample.frames] == sample.indices
    assert sample_frames(path, num_frames=4, backend=backend, max_side=1000).frames.shape == (4, 240, 320, 3)


def test_max_side_where_decord_cannot_scale_still_works(videos):
    """decord 0.6 fails on some output widths (48 among them); auto must fall back, not fail."""
    sample = sample_frames(videos["h264.mp4"], num_frames=4, max_side=48)
    assert sample.frames.shape == (4, 32, 48, 3)
    assert [read_index(f) for f in sample.frames] == sample.indices


def test_probe_reads_the_header(videos):
    meta = probe(videos["h264.mp4"])
    assert (meta.codec, meta.width, meta.height, meta.num_frames) == ("h264", 96, 64, N)
    assert meta.fps == pytest.approx(FPS) and meta.duration_s == pytest.approx(2.0)
    assert meta.container.startswith("mov,mp4") and meta.has_b_frames


def test_bad_arguments(videos):
    with pytest.raises(ValueError, match="backend"):
        sample_frames(videos["h264.mp4"], backend="opencv")
    with pytest.raises(ValueError, match="num_frames"):
        sample_frames(videos["h264.mp4"], num_frames=0)


# ------------------------------------------------------------------------------------------- limits


def test_error_codes_are_distinct_and_stable():
    classes = (VideoTooLarge, ResolutionTooLarge, DurationTooLong, NotAVideo, CorruptVideo)
    codes = {cls: cls.code for cls in classes}
    assert codes == {VideoTooLarge: "video_too_large", ResolutionTooLarge: "resolution_too_large",
                     DurationTooLong: "duration_too_long", NotAVideo: "not_a_video",
                     CorruptVideo: "corrupt_video"}
    assert all(issubclass(cls, video.VideoError) for cls in codes)


def test_file_size_limit(videos):
    path = videos["h264.mp4"]
    with pytest.raises(VideoTooLarge, match="MiB"):
        probe(path, VideoLimits(max_bytes=os.path.getsize(path) - 1))
    probe(path, VideoLimits(max_bytes=os.path.getsize(path)))   # at the limit is fine


@pytest.mark.parametrize("codec, name, message", [
    ("libx264", "huge.mp4", "is 4096x4096"),
    # FFmpeg reports 0x0 for this one once its decoder refuses the size, so the message cannot name it
    ("mpeg4", "huge.avi", "decoder within the limit"),
])
def test_huge_resolution_is_refused_before_any_frame_is_decoded(tmp_path, codec, name, message):
    # one 4096x4096 frame of flat blocks: ~50-200 KB on disk, 50 MB as RGB
    path = make_video(tmp_path / name, codec=codec, num_frames=1, size=(4096, 4096))
    assert os.path.getsize(path) < 300_000
    tracemalloc.start()
    try:
        with pytest.raises(ResolutionTooLarge, match=message):
            sample_frames(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20   # no (H, W, 3) frame was ever allocated in Python
    assert probe(path, VideoLimits(max_pixels=4096 * 4096)).width == 4096


def test_duration_limit_from_header(tmp_path):
    path = make_video(tmp_path / "slow.mp4", num_frames=700, fps=1)   # 700 s of 1 fps
    with pytest.raises(DurationTooLong, match="700"):
        sample_frames(path)


@pytest.mark.parametrize("name", ["h264.mp4", "vp9.webm"])
def test_frame_count_limit(videos, name):
    """mp4 declares its 48 frames; webm does not, so the demux pass counts and stops."""
    with pytest.raises(DurationTooLong, match="10"):
        sample_frames(videos[name], limits=VideoLimits(max_frames=10), backend="pyav")
    with pytest.raises(DurationTooLong):
        sample_frames(videos[name], limits=VideoLimits(max_duration_s=1.0), backend="pyav")


# ------------------------------------------------------------------------------- not a video, damage


def _write_not_videos(directory) -> dict[str, str]:
    rng = np.random.default_rng(0)
    files = {
        "notes.txt": b"hello, this is not a video\n" * 40,        # FFmpeg's tty demuxer would "play" it
        "notes_named.mp4": b"hello, this is not a video\n" * 40,
        "empty.mp4": b"",
        "random.mp4": rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes(),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = str(directory / name)
        with open(paths[name], "wb") as f:
            f.write(data)
    for name in ("image.png", "image_named.mp4"):
        paths[name] = str(directory / name)
        Image.fromarray(draw_index(3, (64, 64))).save(paths[name], format="PNG")
    paths["audio.m4a"] = str(directory / "audio.m4a")
    with av.open(paths["audio.m4a"], "w") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return paths


def test_not_a_video(tmp_path):
    for name, path in _write_not_videos(tmp_path).items():
        with pytest.raises(NotAVideo) as info:
            sample_frames(path, backend="pyav")
        assert path in str(info.value), name


def _truncate(path: str, out: str, keep: float) -> str:
    with open(path, "rb") as f:
        data = f.read()
    with open(out, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return out


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict[str, tuple[str, type]]:
    """name -> (path, the error it must raise)."""
    directory = tmp_path_factory.mktemp("damaged")
    # PyAV (like most encoders) writes the mp4 index (moov) after the data: cut short, the file has no
    # stream description at all, so FFmpeg cannot even tell it held video -> NotAVideo.
    plain = make_video(directory / "plain.mp4", num_frames=96, options={"preset": "medium"})
    # With +faststart the index comes first: the header declares 96 frames, the data stops -> CorruptVideo.
    fast = make_video(directory / "fast.mp4", num_frames=96, options={"preset": "medium"},
                      container_options={"movflags": "+faststart"})
    avi = make_video(directory / "clip.avi", codec="mpeg4", num_frames=96)
    with open(plain, "rb") as f:
        data = bytearray(f.read())
    mdat, moov = data.find(b"mdat"), data.find(b"moov")
    data[mdat + 8: moov] = bytes(moov - mdat - 8)          # index intact, every frame's bytes zeroed
    zeroed = directory / "zeroed.mp4"
    zeroed.write_bytes(bytes(data))
    return {
        "moov-at-end cut at 60%": (_truncate(plain, str(directory / "cut_plain.mp4"), 0.6), NotAVideo),
        "faststart cut at 60%": (_truncate(fast, str(directory / "cut_fast.mp4"), 0.6), CorruptVideo),
        "faststart cut at 95%": (_truncate(fast, str(directory / "cut_fast95.mp4"), 0.95), CorruptVideo),
        "avi cut at 50%": (_truncate(avi, str(directory / "cut.avi"), 0.5), CorruptVideo),
        "frame data zeroed": (str(zeroed), CorruptVideo),
    }


def test_damaged_files_with_pyav(damaged):
    for name, (path, error) in damaged.items():
        with pytest.raises(error) as info:
            sample_frames(path, backend="pyav")
        assert path in str(info.value), name


def _outcome(path: str) -> str:
    """In a spawned process: the VideoError code sample_frames(backend="auto") raises, or "ok"."""
    try:
        sample_frames(path)
    except video.VideoError as exc:
        return exc.code
    return "ok"


def _decord_then_encode_vp9(directory: str) -> list[int]:
    """Fresh interpreter: sample with decord, then encode VP9 (decord's libvpx must not shadow PyAV's)."""
    path = make_video(os.path.join(directory, "probe.mp4"), num_frames=12)
    sample = sample_frames(path, num_frames=3, backend="decord")
    make_video(os.path.join(directory, "after.webm"), codec="libvpx-vp9", num_frames=3)
    return sample.indices


@pytest.mark.slow
def test_auto_on_damaged_files_in_a_subprocess(damaged, tmp_path):
    """auto must raise the same errors and never crash: its demux pass keeps damaged files from decord."""
    names = list(damaged)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        outcomes = list(pool.map(_outcome, [damaged[n][0] for n in names]))
        if HAS_DECORD:
            assert pool.submit(_decord_then_encode_vp9, str(tmp_path)).result() == [0, 6, 11]
    assert dict(zip(names, outcomes, strict=True)) == {n: damaged[n][1].code for n in names}


# ---------------------------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("container,faststart", [("mp4", False), ("mp4", True), ("mov", False)])
@pytest.mark.parametrize("degrees", [90, 180, -90])
def test_phone_rotation_is_read_like_ffmpeg_and_applied_by_every_backend(tmp_path, container, faststart,
                                                                          degrees):
    # the same coded frames twice, once with a display matrix (moov after or before mdat)
    options = {"movflags": "+faststart"} if faststart else None
    plain = make_video(tmp_path / "plain", container=container, num_frames=12, size=(96, 64),
                       container_options=options)
    turned = make_video(tmp_path / "turned", container=container, num_frames=12, size=(96, 64),
                        container_options=options, rotation=degrees)
    expected = degrees % 360
    with av.open(turned) as c:   # FFmpeg's own reading of the matrix, through PyAV
        assert next(c.decode(video=0)).rotation % 360 == expected
    assert video.display_rotation(turned) == expected and video.display_rotation(plain) == 0
    assert probe(turned).rotation == expected and (probe(turned).width, probe(turned).height) == (96, 64)

    reference = sample_frames(plain, 4, backend="pyav").frames                      # (4, 64, 96, 3)
    for backend in ("auto", "pyav"):   # auto: PyAV, since decord scrambles rotated frames that it scales
        sample = sample_frames(turned, 4, backend=backend)
        # counter-clockwise, as FFmpeg defines the angle: 90 puts the right edge on top
        assert np.array_equal(sample.frames, np.rot90(reference, k=expected // 90, axes=(1, 2))), backend
        assert sample.frames.flags["C_CONTIGUOUS"] and sample.meta.rotation == expected
        assert sample.backend == "pyav"
    with pytest.raises(ValueError, match="display rotation"):
        sample_frames(turned, 4, backend="decord")
    if importlib.util.find_spec("decord") is not None:   # decord, unscaled, turns them the same way itself
        import decord

        reader = decord.VideoReader(turned, ctx=decord.cpu(0))
        assert np.array_equal(reader.get_batch(sample.indices).asnumpy(), sample.frames)
    portrait = sample_frames(turned, 4, max_side=48).frames
    assert portrait.shape[1:] == ((48, 32, 3) if expected in (90, 270) else (32, 48, 3))


def test_rotation_of_a_damaged_header_is_upright_not_an_error(tmp_path):
    # hostile box sizes: zero, larger than the file, a 64-bit size cut short, a trak without hdlr
    cases = {
        "bogus_size": b"\x00\x00\x00\x10moov" + b"\xff\xff\xff\xfftrak" + b"\x00" * 8,
        "too_long": b"\x7f\xff\xff\xffmoov" + b"\x00" * 32,
        "short_large": b"\x00\x00\x00\x01moov\x00\x00",
        "no_hdlr": b"\x00\x00\x00\x18moov" + b"\x00\x00\x00\x10trak" + b"\x00\x00\x00\x08tkhd",
        "empty": b"",
        # 10,000 empty trak boxes: the shared budget stops the walk after 4,096 boxes, quickly
        "many_traks": (8 + 10_000 * 8).to_bytes(4, "big") + b"moov" + b"\x00\x00\x00\x08trak" * 10_000,
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(data)
        assert video.display_rotation(path) == 0, name


def test_upright_turns_counter_clockwise():
    frames = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)   # (T, H=2, W=3, 3)
    turned = video.upright(frames, 90)
    assert turned.shape == (2, 3, 2, 3)
    assert np.array_equal(turned[:, 0, :], frames[:, :, -1])    # the right column is now the top row
    assert video.upright(frames, 0) is frames
    assert np.array_equal(video.upright(frames, 270), np.rot90(frames, k=-1, axes=(1, 2)))
