"""Hardening run: a real ``capguard serve`` under fuzzed uploads, load, broken clients, kill -9, schemathesis.

    .venv/bin/python bench/stress.py --quick     # CI-sized (40-60 s on 2 cores); tests/test_stress.py runs it
    .venv/bin/python bench/stress.py             # full: 1000 fuzz cases, 16 clients x 60 s, ...
    .venv/bin/python bench/stress.py --checkpoint-root checkpoints --checkpoint demo   # a trained stack

It starts ``capguard serve`` as a subprocess on a free port, with a temp data dir, two decoder processes
running tests/test_server_hooks.py's decoder (which decodes like capguard.models.video unless a file starts with
one of its magic words: then the worker really segfaults, aborts or hangs), and runs five phases:

1. fuzz    >= 1000 (quick: ~100) uploads: seed videos in h264/mp4, mpeg4/avi, vp9/webm, av1/mkv with bit
           flips, truncations, spliced garbage, corrupted headers (moov/EBML/RIFF and the first 1 KB),
           duplicated and zeroed chunks; non-videos; decompression bombs (a frame size or duration
           declared far beyond the limits) that must be refused (413) with the decoders' RSS bounded.
2. load    N clients posting valid videos for T seconds, then a burst larger than the queue: only 200 and
           503 allowed; latency percentiles, throughput and the server's RSS growth.
3. slow    raw sockets: uploads cut off mid-body (with Content-Length, chunked, reset), slow-drip bodies,
           a Content-Length larger or smaller than the body, a 10 MB form field, idle half-open
           connections, and more stuck uploads than the server has file descriptors (it runs with the
           common default limit of 1024): those it cannot store get 503, then everything is served again.
4. faults  a hanging decoder (504 within the time limit), crashing decoders, decoders killed mid-decode,
           then kill -9 of the server mid-load and a restart on the same data dir: every acknowledged
           caption is in the caption log, the log passes PRAGMA integrity_check, the guard window is back.
5. schema  schemathesis (positive and negative cases) against the served OpenAPI schema: no 5xx, every
           response conforms to the schema.

After each phase it waits for the server to go idle and counts what is left over: temp uploads in
data_dir/tmp, decoder processes beyond the configured two (children of the server, from /proc),
capguard_queue_depth. At the end it prints one table and exits 1 if any invariant broke: zero server
deaths, zero leaks, zero lost records, zero 5xx, every error in the documented JSON shape.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import selectors
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
sys.path[:0] = [str(REPO), str(TESTS)]   # tests/videomaker.py and test_server_hooks.py (magic words)

import httpx  # noqa: E402
from test_server_hooks import ABORT, HANG, SEGFAULT  # noqa: E402

ADMIN_TOKEN, METRICS_TOKEN = "stress-admin-token", "stress-metrics-token"
DECODE_WORKERS = 2                   # decoder processes the server is configured with
SERVER_NOFILE = 1024                 # the server's open-file limit: the common default soft limit
MAX_UPLOAD = 8 * 2**20               # the server's max_upload_bytes in this run
GUARD_WINDOW, GUARD_MIN = 100, 30    # the server's default guard window and warm-up
CAPTION_STATUSES = {200, 400, 404, 413, 415, 422, 503, 504}   # what POST /caption may answer (docs/api.md)
BOUNDARY = "capguardstressboundary"


@dataclass(frozen=True)
class Plan:
    fuzz_cases: int          # uploads in phase 1, bombs and non-videos included
    fuzz_clients: int        # concurrent fuzz clients: enough to keep both decoders busy
    load_clients: int        # concurrent clients in phase 2
    load_seconds: float      # how long phase 2 posts
    kill_after: int          # captions acknowledged in phase 4's load before the server is killed
    kill_clients: int        # clients posting while it is killed
    schema_examples: int     # schemathesis examples per operation and mode (positive, negative)
    decode_timeout_s: float  # the server's decode limit: the hang test waits this long
    drip_clients: int        # concurrent slow-drip uploads
    drip_bytes: int          # bytes per send of a slow drip ...
    drip_interval_s: float   # ... and the pause between sends
    idle_sockets: int        # connections that send half a request line and wait
    flood: int               # stuck half-uploads at once: each holds a socket and a temp file in the server
    burst: int               # requests fired at the same instant after the load: over queue_size (64) -> 503s
    settle_s: float          # how long cleanup may take after a phase before a leftover counts as leaked


QUICK = Plan(fuzz_cases=100, fuzz_clients=3, load_clients=4, load_seconds=8, kill_after=8, kill_clients=3,
             schema_examples=5, decode_timeout_s=5.0, drip_clients=2, drip_bytes=24, drip_interval_s=0.004,
             idle_sockets=20, flood=600, burst=96, settle_s=20)
FULL = Plan(fuzz_cases=1000, fuzz_clients=4, load_clients=16, load_seconds=60, kill_after=40, kill_clients=8,
            schema_examples=50, decode_timeout_s=10.0, drip_clients=4, drip_bytes=5, drip_interval_s=0.005,
            idle_sockets=100, flood=1200, burst=160, settle_s=30)


# ------------------------------------------------------------------------------------ what we count


@dataclass
class PhaseStats:
    name: str
    tried: int = 0                                        # requests (or raw connections) made
    answers: Counter = field(default_factory=Counter)     # "200", "413 video_too_large", "503 busy", ...
    conn_errors: int = 0          # transport failures we did not cause: must stay 0
    cut_on_purpose: int = 0       # connections we cut, or that died with the server we killed
    deaths: int = 0               # the server process died without being told to
    leaked_tmp: int = 0           # files left in data_dir/tmp once idle
    leaked_workers: int = 0       # decoder processes beyond DECODE_WORKERS (zombies and orphans included)
    queue_left: int = 0           # capguard_queue_depth once idle
    lost: int | None = None       # acknowledged captions missing from the caption log (checked in faults/end)
    peak_server_mb: float = 0.0   # server RSS, sampled
    peak_total_mb: float = 0.0    # server + decoder processes RSS, sampled
    figures: dict[str, str] = field(default_factory=dict)   # phase-specific numbers for the table
    violations: list[str] = field(default_factory=list)     # broken invariants, in words

    def count(self, answer: Answer) -> None:
        self.tried += 1
        if answer.status is None:
            self.conn_errors += 1
        else:
            self.answers[answer.key] += 1
        if answer.problem:
            self.violate(answer.problem)

    def violate(self, message: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(message)

    @property
    def server_errors(self) -> int:
        """5xx other than the documented 503 (overload) and 504 (decode time limit)."""
        return sum(n for key, n in self.answers.items() if key[:1] == "5" and key[:3] not in ("503", "504"))


@dataclass
class Answer:
    status: int | None     # None: no HTTP answer at all
    code: str | None       # error.code of an error answer
    body: dict | None      # the parsed JSON
    seconds: float         # wall time of the request
    problem: str | None    # how the answer breaks the contract, if it does

    @property
    def key(self) -> str:
        if self.status is None:
            return "connection error"
        return str(self.status) if self.code is None else f"{self.status} {self.code}"


def classify(status: int, headers: dict[str, str], body: bytes, seconds: float, what: str,
             allowed: set[int] | None = None) -> Answer:
    """Parse an answer and check the documented error shape: {"error": {"code": str, "message": str}}.

    Example: classify(415, {}, b'{"error": {"code": "not_a_video", "message": "..."}}', 0.1, "x")
    -> Answer(status=415, code="not_a_video", ..., problem=None).
    """
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if status == 200:
        ok = isinstance(parsed, dict)
        return Answer(200, None, parsed, seconds, None if ok else f"{what}: 200 without a JSON object")
    error = parsed.get("error") if isinstance(parsed, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    problem = None
    if not (isinstance(error, dict) and set(parsed) == {"error"} and isinstance(code, str) and code
            and isinstance(error.get("message"), str) and error["message"]):
        problem = f"{what}: {status} not in the documented error shape: {body[:200]!r}"
    elif status == 503 and "retry-after" not in {k.lower() for k in headers}:
        problem = f"{what}: 503 {code} without Retry-After"
    elif allowed is not None and status not in allowed:
        problem = f"{what}: undocumented status {status} {code}"
    return Answer(status, code if isinstance(code, str) else "?", parsed, seconds, problem)


# ------------------------------------------------------------------------------------------ /proc


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...]; None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def children(pid: int) -> list[int]:
    """Child processes of `pid` (zombies included), from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] == "Z"


def memory_mb(pid: int, key: str = "VmRSS") -> float:
    """VmRSS (or VmHWM: the peak) of a process in MB; 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Sampler(threading.Thread):
    """Samples the server's and its decoders' RSS every `interval` s into the current phase's peaks."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True, name="rss-sampler")
        self.interval = interval
        self.pid: int | None = None
        self.phase: PhaseStats | None = None
        self.worker_peak_mb = 0.0    # largest VmHWM of any decoder process seen since it was last set to 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def sample(self) -> tuple[float, float]:
        pid, phase = self.pid, self.phase
        if pid is None:
            return 0.0, 0.0
        server = memory_mb(pid)
        kids = children(pid)
        total = server + sum(memory_mb(k) for k in kids)
        self.worker_peak_mb = max([self.worker_peak_mb, *(memory_mb(k, "VmHWM") for k in kids)])
        if phase is not None:
            phase.peak_server_mb = max(phase.peak_server_mb, server)
            phase.peak_total_mb = max(phase.peak_total_mb, total)
        return server, total

    def stop(self) -> None:
        self._halt.set()


# ---------------------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``capguard serve`` as a subprocess: start, wait until ready, kill -9, stop."""

    def __init__(self, root: Path, checkpoint: str, data_dir: Path, log_path: Path, plan: Plan, device: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.checkpoint, self.log_path = checkpoint, log_path
        self.data_dir = data_dir
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(TESTS),
                                                                os.environ.get("PYTHONPATH")])),
                    "CAPGUARD_CHECKPOINTS_ROOT": str(root), "CAPGUARD_DATA_DIR": str(data_dir),
                    "CAPGUARD_DEVICE": device, "CAPGUARD_DECODE_WORKERS": str(DECODE_WORKERS),
                    "CAPGUARD_DECODE_TIMEOUT_S": str(plan.decode_timeout_s),
                    "CAPGUARD_DECODER": "test_server_hooks:decoder",
                    "CAPGUARD_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
                    "CAPGUARD_ADMIN_TOKEN": ADMIN_TOKEN, "CAPGUARD_METRICS_TOKEN": METRICS_TOKEN}
        script = Path(sys.executable).with_name("capguard")
        self.command = [str(script)] if script.exists() else [sys.executable, "-m", "capguard.server.cli"]
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout_s: float = 300.0) -> float:
        """Start and wait for /readyz; returns the seconds it took."""
        started = time.monotonic()

        def limit_files() -> None:   # in the child, before exec
            resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_NOFILE, SERVER_NOFILE))

        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.command, "serve", "--port", str(self.port), "--checkpoint", self.checkpoint],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=limit_files)
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise SystemExit(f"capguard serve exited ({self.process.returncode}); log:\n"
                                 f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.process.kill()
        raise SystemExit(f"capguard serve not ready in {timeout_s:.0f} s; log:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (uvicorn's graceful shutdown); the exit status, or None if it had to be killed."""
        if not self.alive():
            return self.process.returncode if self.process else None
        self.process.terminate()
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            return None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


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


# ------------------------------------------------------------------------------------------- the run


class Run:
    """Everything the phases share: the plan, the server, the sampler, the acknowledged captions."""

    def __init__(self, args: argparse.Namespace, plan: Plan, tmp: Path):
        self.args, self.plan, self.tmp = args, plan, tmp
        self.rng = random.Random(args.seed)
        self.data_dir = tmp / "data"
        self.tmp_dir = self.data_dir / "tmp"
        root, name = self._checkpoint(args, tmp)
        self.server = Server(root, name, self.data_dir, tmp / "serve.log", plan, args.device)
        self.sampler = Sampler()
        self.acked: Counter = Counter()    # (video_sha256, caption) -> 200 answers received
        self.last_guard: dict | None = None   # the guard of the latest 200, for the restart check
        self._lock = threading.Lock()
        self._local = threading.local()
        self.phases: list[PhaseStats] = []
        self.max_new_tokens = str(args.max_new_tokens) if args.max_new_tokens > 0 else None

    @staticmethod
    def _checkpoint(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
        if args.checkpoint_root:
            return Path(args.checkpoint_root).resolve(), args.checkpoint
        root = tmp / "checkpoints"
        subprocess.run([sys.executable, "-m", "capguard.server.cli", "init-checkpoint", str(root / args.checkpoint)],
                       check=True, cwd=REPO, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return root, args.checkpoint

    # -------------------------------------------------------------------------------------- clients

    def client(self) -> httpx.Client:
        """One httpx client per thread (and per server incarnation)."""
        client = getattr(self._local, "client", None)
        if client is None or getattr(self._local, "url", None) != self.server.url:
            client = self._local.client = httpx.Client(base_url=self.server.url, timeout=180)
            self._local.url = self.server.url
        return client

    def post_video(self, data: bytes, what: str, filename: str = "clip.mp4", fields: dict | None = None,
                   allowed: set[int] | None = None) -> Answer:
        """POST /caption; a 200 is recorded as acknowledged (and checked against the upload's sha256)."""
        form = {**({"max_new_tokens": self.max_new_tokens} if self.max_new_tokens else {}), **(fields or {})}
        started = time.perf_counter()
        try:
            r = self.client().post("/caption", files={"video": (filename, data, "application/octet-stream")},
                                   data=form)
        except httpx.TransportError as exc:
            return Answer(None, None, None, time.perf_counter() - started, None if not self.server.alive()
                          else f"{what}: connection error {type(exc).__name__}: {exc}")
        answer = classify(r.status_code, dict(r.headers), r.content, time.perf_counter() - started, what,
                          CAPTION_STATUSES if allowed is None else allowed)
        if answer.status == 200 and answer.body:
            self.acknowledge(answer.body, data, what, answer)
        return answer

    def acknowledge(self, body: dict, data: bytes, what: str, answer: Answer) -> None:
        sha, caption = body.get("video_sha256"), body.get("caption")
        if sha != hashlib.sha256(data).hexdigest():
            answer.problem = f"{what}: video_sha256 {sha!r} is not the upload's sha256"
        with self._lock:
            self.acked[(sha, caption)] += 1
            self.last_guard = body.get("guard")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = self.client().get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    # -------------------------------------------------------------------------------------- phases

    def begin(self, name: str) -> PhaseStats:
        phase = PhaseStats(name)
        self.phases.append(phase)
        self.sampler.phase = phase
        print(f"[{time.strftime('%H:%M:%S')}] phase {name} ...", flush=True)
        return phase

    def settle(self, phase: PhaseStats) -> None:
        """Wait for the server to go idle, then count what is left over (and check it is alive)."""
        if not self.server.alive():
            phase.deaths += 1
            phase.violate(f"{phase.name}: the server died (exit {self.server.process.returncode}); log:\n"
                          f"{self.server.log_tail(15)}")
            self.server.start()
            self.sampler.pid = self.server.pid
        deadline = time.monotonic() + self.plan.settle_s
        while True:
            tmp = sorted(p.name for p in self.tmp_dir.iterdir()) if self.tmp_dir.exists() else []
            kids = children(self.server.pid)
            zombies = [k for k in kids if is_zombie(k)]
            try:
                depth = int(self.metrics().get(("capguard_queue_depth", ()), 0))
            except httpx.TransportError:
                depth = -1
            clean = not tmp and len(kids) == DECODE_WORKERS and not zombies and depth == 0
            if clean or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        phase.leaked_tmp += len(tmp)
        phase.leaked_workers += max(0, len(kids) - DECODE_WORKERS) + len(zombies)
        phase.queue_left += max(0, depth)
        if tmp:
            phase.violate(f"{phase.name}: temp files left in data_dir/tmp: {tmp[:5]}")
        if len(kids) != DECODE_WORKERS or zombies:
            phase.violate(f"{phase.name}: {len(kids)} decoder processes ({len(zombies)} zombies), "
                          f"expected {DECODE_WORKERS}")
        if depth != 0:
            phase.violate(f"{phase.name}: capguard_queue_depth {depth} once idle")

    def caption_log(self) -> tuple[Counter, str]:
        """(Counter of (video_sha256, caption) rows, PRAGMA integrity_check) of the caption log."""
        with sqlite3.connect(self.data_dir / "capguard.db", timeout=30) as db:
            integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
            rows = Counter(db.execute("SELECT video_sha256, caption FROM captions").fetchall())
        db.close()
        return rows, integrity

    def lost_records(self, logged: Counter) -> int:
        with self._lock:
            return sum(max(0, n - logged.get(key, 0)) for key, n in self.acked.items())


def phase_fuzz(run: Run) -> None:
    phase = run.begin("fuzz")
    rng = run.rng
    seeds = make_seeds(run.tmp / "seeds")
    bombs = make_bombs(run.tmp / "bombs")
    odd = make_non_videos(rng)
    cases: list[tuple[str, bytes, str, set[int] | None]] = []
    cases += [(f"seed {label}", data, "clip.bin", {200}) for label, data in seeds]
    cases += [(label, data, "clip.bin", allowed) for label, data, allowed in odd]
    names = list(MUTATIONS)
    while len(cases) + len(bombs) + 2 < run.plan.fuzz_cases:
        label, data = seeds[len(cases) % len(seeds)]
        kinds = [names[len(cases) % len(names)]] + ([rng.choice(names)] if rng.random() < 0.25 else [])
        for kind in kinds:
            data = MUTATIONS[kind](data, rng) or b"\0"
        cases.append((f"{' + '.join(kinds)} of {label}", data, rng.choice(FILENAMES), None))

    # bombs first, on fresh decoders, so their peak RSS (VmHWM) is theirs alone
    run.sampler.worker_peak_mb = 0.0
    for label, data in bombs:
        answer = run.post_video(data, label, allowed={413})
        phase.count(answer)
    run.sampler.sample()
    phase.figures["bomb decoder peak RSS MB"] = f"{run.sampler.worker_peak_mb:.0f}"
    if run.sampler.worker_peak_mb > 512:
        phase.violate(f"a decoder reached {run.sampler.worker_peak_mb:.0f} MB on the bombs: "
                      "frames were allocated")
    for answer in oversize_uploads(run):
        phase.count(answer)

    def one(case: tuple[str, bytes, str, set[int] | None]) -> Answer:
        label, data, filename, allowed = case
        fields = {"num_frames": str(rng.randint(1, 16))} if rng.random() < 0.5 else {}
        return run.post_video(data, label, filename, fields, allowed)

    with ThreadPoolExecutor(run.plan.fuzz_clients) as pool:
        for case, answer in zip(cases, pool.map(one, cases), strict=True):
            phase.count(answer)
            if answer.code == "decode_failed":   # capguard.models.video let a non-VideoError out: a decoder bug
                phase.violate(f"{case[0]}: decode_failed: {answer.body['error']['message']}")
    run.settle(phase)


def oversize_uploads(run: Run) -> list[Answer]:
    """An upload over max_upload_bytes, once with Content-Length and once chunked: both 413 at once."""
    answers = [run.post_video(b"\0" * (MAX_UPLOAD + 1), "oversize with Content-Length", allowed={413})]
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="video"; filename="big.mp4"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def chunked() -> Iterable[bytes]:
        yield head
        for _ in range(MAX_UPLOAD // 2**16 + 8):
            yield b"\0" * 2**16
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    started = time.perf_counter()
    try:
        r = run.client().post("/caption", content=chunked(),
                              headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        answers.append(classify(r.status_code, dict(r.headers), r.content, time.perf_counter() - started,
                                "oversize chunked", {413}))
    except httpx.TransportError as exc:   # the server may answer 413 and close while we still send
        answers.append(Answer(None, None, None, time.perf_counter() - started,
                              f"oversize chunked: connection error {exc}"))
    return answers


def phase_load(run: Run) -> None:
    phase = run.begin("load")
    clips = make_clips(run.tmp / "clips", 24)
    latencies: list[float] = []
    answers: list[Answer] = []
    lock = threading.Lock()
    run.sampler.sample()
    rss_before = memory_mb(run.server.pid)
    deadline = time.monotonic() + run.plan.load_seconds

    def client(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < deadline:
            answer = run.post_video(rng.choice(clips), f"load client {i}", allowed={200, 503})
            with lock:
                answers.append(answer)
                if answer.status == 200:
                    latencies.append(answer.seconds)
            if answer.status == 503:
                time.sleep(0.1)

    started = time.monotonic()
    with ThreadPoolExecutor(run.plan.load_clients) as pool:
        list(pool.map(client, range(run.plan.load_clients)))
    wall = time.monotonic() - started
    for answer in answers:
        phase.count(answer)
    rss_after = memory_mb(run.server.pid)
    if latencies:
        q = statistics.quantiles(latencies, n=100, method="inclusive")
        phase.figures["latency p50/p95/p99 ms"] = f"{1e3 * q[49]:.0f}/{1e3 * q[94]:.0f}/{1e3 * q[98]:.0f}"
    phase.figures["throughput captions/s"] = f"{len(latencies) / wall:.2f}"
    phase.figures["server RSS growth MB"] = (f"{rss_after - rss_before:+.0f} "
                                             f"({rss_before:.0f}->{rss_after:.0f})")
    phase.figures["load clients x seconds"] = f"{run.plan.load_clients} x {run.plan.load_seconds:g}"

    # a burst: all at the same instant, more than the queue holds; the overflow must be 503 + Retry-After
    barrier = threading.Barrier(run.plan.burst)

    def burst(i: int) -> Answer:
        barrier.wait()
        return run.post_video(clips[i % len(clips)], "burst", allowed={200, 503})

    with ThreadPoolExecutor(run.plan.burst) as pool:
        burst_answers = list(pool.map(burst, range(run.plan.burst)))
    for answer in burst_answers:
        phase.count(answer)
    refused = sum(a.status == 503 for a in burst_answers)
    phase.figures["burst served / 503"] = f"{run.plan.burst - refused} / {refused}"
    run.settle(phase)


# ------------------------------------------------------------------------------ raw-socket clients


def multipart(video: bytes, filename: str = "clip.mp4", fields: dict[str, str] | None = None) -> bytes:
    """A multipart/form-data body with BOUNDARY: the text fields, then the video part."""
    parts = []
    for name, value in (fields or {}).items():
        value = value.encode() if isinstance(value, str) else value
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value
                     + b"\r\n")
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="video"; filename="{filename}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + video + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def request_head(port: int, length: int | None, chunked: bool = False, path: str = "/caption") -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
             f"Content-Type: multipart/form-data; boundary={BOUNDARY}", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket, timeout_s: float) -> tuple[int, dict[str, str], bytes] | None:
    """One HTTP response from a raw socket; None when the server sends nothing within timeout_s or closes."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        length = int({k.lower(): v for k, v in headers.items()}.get("content-length", 0))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body
    except (TimeoutError, OSError):
        return None


def readable(socks: list[socket.socket], timeout_s: float) -> list[socket.socket]:
    """The sockets with something to read (epoll: select() cannot watch descriptors above 1023)."""
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        return [key.fileobj for key, _ in selector.select(timeout_s)]


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def abort(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed client or a dropped network would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    sock.close()


def phase_slow(run: Run) -> None:
    phase = run.begin("slow")
    port = run.server.port
    video = make_clips(run.tmp / "slow", 1, offset=100)[0]
    body = multipart(video, fields={"max_new_tokens": run.max_new_tokens} if run.max_new_tokens else None)

    def cut(kind: str) -> None:
        """Start an upload and go away before it is complete."""
        sock = connect(port)
        if kind == "half body, close":
            sock.sendall(request_head(port, len(body)) + body[:len(body) // 2])
            time.sleep(0.3)
            sock.close()
        elif kind == "half body, reset":
            sock.sendall(request_head(port, len(body)) + body[:len(body) // 2])
            time.sleep(0.3)
            abort(sock)
        elif kind == "chunked, no last chunk":
            piece = body[:len(body) // 2]
            sock.sendall(request_head(port, None, chunked=True) + f"{len(piece):x}\r\n".encode() + piece
                         + b"\r\n")
            time.sleep(0.3)
            sock.close()
        elif kind == "headers only":
            sock.sendall(request_head(port, len(body)))
            time.sleep(0.3)
            abort(sock)
        elif kind == "larger Content-Length":
            # the whole body, but a Content-Length promising 1000 more bytes: the server must wait, not answer
            sock.sendall(request_head(port, len(body) + 1000) + body)
            answer = read_answer(sock, 2.0)
            if answer is not None:
                phase.violate(f"larger Content-Length: answered {answer[0]} before the body was complete")
            sock.close()
        phase.tried += 1
        phase.cut_on_purpose += 1

    kinds = ["half body, close", "half body, reset", "chunked, no last chunk", "headers only",
             "larger Content-Length"]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(cut, kinds * 2))

    def raw(what: str, payload: bytes, allowed: set[int], pieces: int = 1, pause_s: float = 0.0) -> Answer:
        """Send `payload` (`pieces` sends, `pause_s` apart; stop early if an answer comes) and read it."""
        started = time.perf_counter()
        sent = 0
        with connect(port) as sock:
            try:
                step = max(1, len(payload) // pieces)
                for at in range(0, len(payload), step):
                    if readable([sock], 0):
                        break   # the server answered early (413, 422): stop sending, as a real client would
                    sock.sendall(payload[at:at + step])
                    sent = at + step
                    if pause_s:
                        time.sleep(pause_s)
            except OSError:
                pass
            got = read_answer(sock, 120)
        sent_to[what] = min(sent, len(payload))
        if got is None:
            return Answer(None, None, None, time.perf_counter() - started, f"{what}: no answer")
        return classify(*got, time.perf_counter() - started, what, allowed)

    sent_to: dict[str, int] = {}

    # slow-drip bodies: a few bytes at a time, while a normal client is served meanwhile
    drip = request_head(port, len(body)) + body
    pieces = len(drip) // run.plan.drip_bytes
    with ThreadPoolExecutor(run.plan.drip_clients + 1) as pool:
        drips = [pool.submit(raw, "slow drip", drip, {200}, pieces, run.plan.drip_interval_s)
                 for _ in range(run.plan.drip_clients)]
        time.sleep(0.5)
        normal = run.post_video(make_clips(run.tmp / "slow", 1, offset=101)[0], "normal during drips",
                                allowed={200})
        phase.count(normal)
        phase.figures["normal request during drips s"] = f"{normal.seconds:.2f}"
        started = time.perf_counter()
        for future in drips:
            answer = future.result()
            phase.count(answer)
            if answer.status == 200:
                run.acknowledge(answer.body, video, "slow drip", answer)
        phase.figures["slow drip s"] = f"{time.perf_counter() - started + 0.5:.1f}"

    # a Content-Length shorter than the body: the multipart ends early (400); the rest is not a request
    short = request_head(port, len(body) - 100) + body
    phase.count(raw("shorter Content-Length", short, {400}))
    # a 10 MB form field, chunked (no Content-Length to refuse it by): 422 after its first KB, not buffered
    big_field = multipart(video, fields={"checkpoint": "x" * (10 * 2**20)})
    chunks = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n"
                      for c in (big_field[at:at + 2**16] for at in range(0, len(big_field), 2**16)))
    answer = raw("10 MB checkpoint field", request_head(port, None, chunked=True) + chunks + b"0\r\n\r\n",
                 {422}, pieces=len(big_field) // 2**16)
    phase.count(answer)
    phase.figures["10 MB field refused after sending MB"] = f"{sent_to['10 MB checkpoint field'] / 2**20:.1f}"
    # half-open connections that never finish their request line, while a normal request is served
    idle = [connect(port) for _ in range(run.plan.idle_sockets)]
    for sock in idle:
        sock.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\n")
    phase.count(run.post_video(make_clips(run.tmp / "slow", 1, offset=102)[0], "normal beside idle sockets",
                               allowed={200}))
    for sock in idle:
        sock.close()
    phase.tried += len(idle)
    phase.cut_on_purpose += len(idle)
    flood(run, phase, body)
    # not HTTP at all
    with connect(port) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + run.rng.randbytes(500))
        read_answer(sock, 5)
    phase.tried += 1
    phase.cut_on_purpose += 1
    run.settle(phase)


def flood(run: Run, phase: PhaseStats, body: bytes) -> None:
    """More stuck half-uploads than the server has file descriptors (each holds a socket and a temp file).

    Those it cannot store must get 503 + Retry-After (not a 500); once they go away everything is served.
    """
    port, n = run.server.port, run.plan.flood
    head = request_head(port, len(body)) + body[:len(body) // 2]
    socks = []
    for _ in range(n):
        sock = connect(port)
        sock.sendall(head)
        socks.append(sock)
    phase.tried += n
    time.sleep(2.0)   # the server takes them in (accept pauses while it is out of descriptors)
    answered: list[tuple[int, dict[str, str], bytes]] = []
    pending = list(socks)
    while pending:
        ready = readable(pending, 1.0)
        if not ready:
            break   # a quiet second: the rest are stored and waiting for their bodies
        for sock in ready:
            got = read_answer(sock, 5)
            pending.remove(sock)
            if got is not None:
                answered.append(got)
    stored = len(list(run.tmp_dir.iterdir()))
    with ThreadPoolExecutor(1) as pool:   # a normal client while the server is out of descriptors
        normal = pool.submit(run.post_video, make_clips(run.tmp / "slow", 1, offset=103)[0],
                             "normal during the descriptor flood", allowed={200, 503})
        time.sleep(1.0)
        for sock in socks:
            sock.close()
        phase.count(normal.result())
    for got in answered:
        phase.count(classify(*got, 0.0, "descriptor flood", {503}))
    phase.cut_on_purpose += n - len(answered)
    phase.figures["fd flood: stuck uploads stored / 503"] = f"{stored} / {len(answered)} (of {n})"
    served_after(run, phase, make_clips(run.tmp / "slow", 1, offset=104)[0], "normal after the flood")


def served_after(run: Run, phase: PhaseStats, data: bytes, what: str, tries: int = 20) -> None:
    """POST until served, retrying 503s (after a second) as a client should; a 200 must come in the end."""
    for _ in range(tries):
        answer = run.post_video(data, what, allowed={200, 503})
        phase.count(answer)
        if answer.status != 503:
            return
        time.sleep(1.0)
    phase.violate(f"{what}: still 503 after {tries} tries")


# ------------------------------------------------------------------------------------------- faults


def phase_faults(run: Run) -> None:
    phase = run.begin("faults")
    plan, server = run.plan, run.server
    clips = make_clips(run.tmp / "faults", 4, offset=200)

    # a hanging decoder answers 504 at the time limit; the other decoder serves meanwhile
    with ThreadPoolExecutor(2) as pool:
        hanging = pool.submit(run.post_video, HANG + b"\0" * 64, "hanging decoder", allowed={504})
        time.sleep(0.5)
        phase.count(run.post_video(clips[0], "normal beside a hanging decoder", allowed={200}))
        answer = hanging.result()
    phase.count(answer)
    phase.figures["hang answered after s"] = f"{answer.seconds:.1f} (limit {plan.decode_timeout_s:g})"
    if answer.status == 504 and answer.seconds > plan.decode_timeout_s + 15:
        phase.violate(f"the hanging decode took {answer.seconds:.1f} s to answer "
                      f"(limit {plan.decode_timeout_s})")

    # decoders that crash: 422 decoder_crashed, a fresh process takes over
    for magic, what in ((SEGFAULT, "segfaulting decoder"), (ABORT, "aborting decoder")):
        answer = run.post_video(magic + b"\0" * 64, what, allowed={422})
        phase.count(answer)
        if answer.code not in (None, "decoder_crashed"):
            phase.violate(f"{what}: code {answer.code}, expected decoder_crashed")
    # every decoder killed (one of them mid-decode): that request gets 422, the next ones are served
    with ThreadPoolExecutor(1) as pool:
        hanging = pool.submit(run.post_video, HANG + b"\1" * 64, "decoder killed mid-decode", allowed={422})
        deadline = time.monotonic() + 30
        while not any(run.tmp_dir.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)   # the upload is stored: its decode is starting
        time.sleep(0.5)
        for pid in children(server.pid):
            os.kill(pid, signal.SIGKILL)
        answer = hanging.result()
    phase.count(answer)
    phase.figures["killed mid-decode answered after s"] = f"{answer.seconds:.1f}"
    for clip in clips:
        phase.count(run.post_video(clip, "after the decoders were killed", allowed={200}))
    run.settle(phase)

    # kill -9 mid-load, restart on the same data dir
    fingerprint = next(c["fingerprint"] for c in run.client().get("/checkpoints").json()["checkpoints"]
                       if c["active"])
    pool_clips = make_clips(run.tmp / "kill", plan.kill_after * 2, offset=300)
    by_sha = {hashlib.sha256(c).hexdigest(): c for c in pool_clips}
    stop = threading.Event()
    acked_here = Counter()
    lock = threading.Lock()

    def client(i: int) -> list[Answer]:
        answers = []
        n = i
        while not stop.is_set():
            answer = run.post_video(pool_clips[n % len(pool_clips)], f"kill-phase client {i}",
                                    allowed={200, 503})
            n += plan.kill_clients
            answers.append(answer)
            if answer.status is None:
                break
            if answer.status == 200:
                with lock:
                    acked_here[answer.body["video_sha256"]] += 1
        return answers

    with ThreadPoolExecutor(plan.kill_clients) as pool:
        futures = [pool.submit(client, i) for i in range(plan.kill_clients)]
        while sum(acked_here.values()) < plan.kill_after and not all(f.done() for f in futures):
            time.sleep(0.05)
        # two uploads stuck halfway, so the killed server leaves temp files behind for the restart to find
        body = multipart(pool_clips[0])
        stuck = [connect(server.port) for _ in range(2)]
        for sock in stuck:
            sock.sendall(request_head(server.port, len(body)) + body[:len(body) // 2])
        deadline = time.monotonic() + 10
        while len(list(run.tmp_dir.iterdir())) < len(stuck) and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = children(server.pid)
        tmp_before_kill = len(list(run.tmp_dir.iterdir()))
        server.kill9()
        for sock in stuck:
            sock.close()
        phase.tried += len(stuck)
        phase.cut_on_purpose += len(stuck)
        stop.set()
        for future in futures:
            for answer in future.result():
                if answer.status is None:
                    phase.tried += 1
                    phase.cut_on_purpose += 1
                else:
                    phase.count(answer)
    last_guard = run.last_guard or {}
    phase.figures["acked before kill -9"] = str(sum(acked_here.values()))
    phase.figures["temp uploads left by the killed server"] = str(len(list(run.tmp_dir.iterdir())))
    phase.figures["uploads in flight at kill"] = str(tmp_before_kill)
    deadline = time.monotonic() + 15
    while any(_stat_fields(p) is not None for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphans = [p for p in workers if _stat_fields(p) is not None and not is_zombie(p)]
    if orphans:
        phase.leaked_workers += len(orphans)
        phase.violate(f"decoder processes {orphans} outlived the killed server")
        for pid in orphans:
            os.kill(pid, signal.SIGKILL)

    logged, integrity = run.caption_log()
    phase.lost = run.lost_records(logged)
    if phase.lost:
        phase.violate(f"{phase.lost} acknowledged captions are missing from the caption log after kill -9")
    if integrity != "ok":
        phase.violate(f"PRAGMA integrity_check after kill -9: {integrity}")
    phase.figures["integrity_check after kill -9"] = integrity
    with sqlite3.connect(run.data_dir / "capguard.db") as db:
        distinct = db.execute("SELECT COUNT(DISTINCT video_sha256) FROM captions WHERE checkpoint = ? AND "
                              "fingerprint = ?", (server.checkpoint, fingerprint)).fetchone()[0]
    db.close()

    phase.figures["restart s"] = f"{server.start():.1f}"
    run.sampler.pid = server.pid
    expected = min(GUARD_WINDOW, distinct)
    gauge = run.metrics().get(("capguard_window_captions", (("checkpoint", server.checkpoint),)))
    listed = next(c for c in run.client().get("/checkpoints").json()["checkpoints"] if c["active"])
    seen = by_sha[next(iter(acked_here))] if acked_here else pool_clips[0]
    again = run.post_video(seen, "seen video after restart", allowed={200})
    phase.count(again)
    window = (again.body or {}).get("guard", {}).get("window_captions")
    status = (again.body or {}).get("guard", {}).get("status")
    phase.figures["guard window before/after restart"] = (f"{last_guard.get('window_captions')}/{window} "
                                                           f"(log: {distinct} videos; {status})")
    if gauge != expected or window != expected:
        phase.violate(f"guard window after restart: gauge {gauge}, response {window}; the log holds "
                      f"{distinct} distinct videos, so {expected} expected")
    if window is not None and window < (last_guard.get("window_captions") or 0):
        phase.violate(f"the guard window shrank over the restart: {last_guard.get('window_captions')} "
                      f"-> {window}")
    if status != listed["guard_status"] or (status == "warming_up") != (expected < GUARD_MIN):
        phase.violate(f"guard status after restart: /caption {status}, "
                      f"/checkpoints {listed['guard_status']}, window {expected}")
    run.settle(phase)


# ------------------------------------------------------------------------------------------- schema


def phase_schema(run: Run) -> None:
    """schemathesis against the served schema: positive and negative cases for every operation."""
    try:
        import schemathesis
    except ImportError:
        run.begin("schema").violate("schemathesis is not installed: pip install -e '.[dev]'")
        return
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    phase = run.begin("schema")
    url = run.server.url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_headers_conformance, response_schema_conformance, negative_data_rejection]
    failures: Counter = Counter()
    examples: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]

    def checker(operation, mode):
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=run.plan.schema_examples, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            phase.tried += 1
            try:
                response = case.call(base_url=url, timeout=120)
            except Exception as exc:  # noqa: BLE001 - a transport failure is a finding, not a crash
                phase.conn_errors += 1
                phase.violate(f"schema {operation.label}: {type(exc).__name__}: {exc}")
                return
            phase.answers[_schema_key(response)] += 1
            try:
                case.validate_response(response, checks=checks)
            except FailureGroup as group:
                for failure in group.exceptions:
                    title = f"{operation.label} [{mode.value}]: {failure.title}"
                    failures[title] += 1
                    examples.setdefault(title, f"{response.status_code} {response.text[:200]}")

        return check

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                checker(operation, mode)()
            except Unsatisfiable:   # no negative case exists for an operation without parameters or body
                pass
    for title, n in failures.items():
        phase.violate(f"schema: {title} (x{n}; e.g. {examples[title]})")
    phase.figures["schema operations x modes"] = (f"{len(operations)} x 2, "
                                                  f"{run.plan.schema_examples} examples each")
    phase.figures["schema conformance failures"] = str(sum(failures.values()))
    run.settle(phase)


def _schema_key(response) -> str:
    if response.status_code == 200:
        return "200"
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "(not JSON)"
    return f"{response.status_code} {code}"


# ------------------------------------------------------------------------------------------- the end


def finish(run: Run) -> PhaseStats:
    """Graceful stop, then the caption log and the leftovers once more."""
    phase = run.begin("shutdown")
    workers = children(run.server.pid)
    phase.figures["server peak RSS (VmHWM) MB"] = f"{memory_mb(run.server.pid, 'VmHWM'):.0f}"
    code = run.server.stop()
    phase.figures["exit status on SIGTERM"] = str(code)
    # uvicorn re-raises the signal once it has shut down cleanly, so -15 after its last log line is fine too
    if code not in (0, -signal.SIGTERM) or "Application shutdown complete" not in run.server.log_tail(10):
        phase.violate(f"capguard serve exited with {code} on SIGTERM without a clean shutdown")
    deadline = time.monotonic() + 10
    while any(_stat_fields(p) is not None for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in workers if _stat_fields(p) is not None]
    phase.leaked_workers = len(left)
    if left:
        phase.violate(f"decoder processes {left} outlived the server's shutdown")
    tmp = list(run.tmp_dir.iterdir())
    phase.leaked_tmp = len(tmp)
    logged, integrity = run.caption_log()
    phase.lost = run.lost_records(logged)
    phase.figures["integrity_check at the end"] = integrity
    phase.figures["caption log rows / acknowledged"] = f"{sum(logged.values())} / {sum(run.acked.values())}"
    if integrity != "ok":
        phase.violate(f"PRAGMA integrity_check at the end: {integrity}")
    if phase.lost:
        phase.violate(f"{phase.lost} acknowledged captions are missing from the caption log")
    return phase


def table(run: Run, machine: str) -> str:
    phases = run.phases
    columns = [p.name for p in phases] + ["total"]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: list, total=None) -> None:
        cells = ["-" if v is None else str(v) for v in values]
        rows.append((label, cells + ["-" if total is None else str(total)]))

    def summed(label: str, get: Callable[[PhaseStats], int]) -> None:
        values = [get(p) for p in phases]
        row(label, values, sum(values))

    summed("cases tried", lambda p: p.tried)
    summed("200", lambda p: p.answers.get("200", 0))
    error_keys = sorted({k for p in phases for k in p.answers if k != "200"},
                        key=lambda k: (int(k.split()[0]), k))
    for group, label in (("4", "4xx (all)"), ("503", "503 (all)"), ("504", "504 (all)")):
        for key in (k for k in error_keys if k.startswith(group)):
            summed(f"  {key}", lambda p, key=key: p.answers.get(key, 0))
        summed(label, lambda p, group=group: sum(n for k, n in p.answers.items() if k.startswith(group)))
    for key in (k for k in error_keys if k[:1] == "5" and k[:3] not in ("503", "504")):
        summed(f"  {key}", lambda p, key=key: p.answers.get(key, 0))
    summed("5xx (other)", lambda p: p.server_errors)
    summed("connection errors", lambda p: p.conn_errors)
    summed("cut on purpose (client/kill)", lambda p: p.cut_on_purpose)
    summed("server deaths", lambda p: p.deaths)
    summed("leaked temp files", lambda p: p.leaked_tmp)
    summed("leaked decoder processes", lambda p: p.leaked_workers)
    summed("queue slots left", lambda p: p.queue_left)
    lost = [p.lost for p in phases]
    row("records lost", lost, max((v for v in lost if v is not None), default=0))
    row("peak RSS server MB", [f"{p.peak_server_mb:.0f}" for p in phases],
        f"{max(p.peak_server_mb for p in phases):.0f}")
    row("peak RSS server+decoders MB", [f"{p.peak_total_mb:.0f}" for p in phases],
        f"{max(p.peak_total_mb for p in phases):.0f}")
    for label in dict.fromkeys(k for p in phases for k in p.figures):
        row(label, [p.figures.get(label) for p in phases])

    width0 = max(len(label) for label, _ in rows)
    widths = [max(len(c), *(len(cells[i]) for _, cells in rows)) for i, c in enumerate(columns)]
    lines = [f"{'':<{width0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    for label, cells in rows:
        cells = "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
        lines.append(f"{label:<{width0}}  {cells}")
    return "\n".join([machine, *lines])


def summary(run: Run) -> dict:
    phases = run.phases
    return {
        "tried": sum(p.tried for p in phases),
        "answers": sum((p.answers for p in phases), Counter()),
        "deaths": sum(p.deaths for p in phases),
        "leaked_tmp": sum(p.leaked_tmp for p in phases),
        "leaked_workers": sum(p.leaked_workers for p in phases),
        "queue_left": sum(p.queue_left for p in phases),
        "lost": max((p.lost for p in phases if p.lost is not None), default=0),
        "server_errors": sum(p.server_errors for p in phases),
        "conn_errors": sum(p.conn_errors for p in phases),
        "peak_server_mb": max(p.peak_server_mb for p in phases),
        "peak_total_mb": max(p.peak_total_mb for p in phases),
        "violations": [v for p in phases for v in p.violations],
        "phases": {p.name: {"tried": p.tried, "answers": dict(p.answers), "figures": p.figures,
                            "conn_errors": p.conn_errors, "leaked_tmp": p.leaked_tmp,
                            "leaked_workers": p.leaked_workers, "queue_left": p.queue_left, "lost": p.lost,
                            "deaths": p.deaths, "violations": p.violations} for p in phases},
    }


PHASES = {"fuzz": phase_fuzz, "load": phase_load, "slow": phase_slow, "faults": phase_faults,
          "schema": phase_schema}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI-sized run")
    parser.add_argument("--checkpoint-root",
                        help="serve checkpoints from here (default: a fresh init_checkpoint stack)")
    parser.add_argument("--checkpoint", default="stress", help="checkpoint name under the root")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--fuzz-cases", type=int, help="override the plan's number of fuzz uploads")
    parser.add_argument("--load-clients", type=int)
    parser.add_argument("--load-seconds", type=float)
    parser.add_argument("--max-new-tokens", type=int, default=4,
                        help="per caption: keeps model time small (0: the checkpoint's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server log, data dir)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("fuzz_cases", args.fuzz_cases), ("load_clients", args.load_clients),
                                   ("load_seconds", args.load_seconds)) if v is not None}
    plan = Plan(**{**plan.__dict__, **overrides})
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {sorted(unknown)}; choose from {list(PHASES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)   # the flood's sockets are ours too
    want = 4 * plan.flood if hard == resource.RLIM_INFINITY else min(hard, 4 * plan.flood)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))

    tmp = Path(tempfile.mkdtemp(prefix="capguard-stress-"))
    run = Run(args, plan, tmp)
    started = time.monotonic()
    run.sampler.start()
    print(f"capguard stress ({'quick' if args.quick else 'full'}): temp dir {tmp}", flush=True)
    print(f"server ready in {run.server.start():.1f} s at {run.server.url}", flush=True)
    run.sampler.pid = run.server.pid
    try:
        for name in args.phases.split(","):
            try:
                PHASES[name](run)
            except Exception:  # noqa: BLE001 - a broken phase is reported, the others still run
                phase = run.phases[-1] if run.phases and run.phases[-1].name == name else run.begin(name)
                phase.violate(f"phase {name} crashed:\n{traceback.format_exc()}")
                if not run.server.alive():
                    run.server.start()
                    run.sampler.pid = run.server.pid
        finish(run)
    finally:
        run.sampler.stop()
        if run.server.alive():
            run.server.stop()
    machine = (f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} CPUs  python {sys.version.split()[0]}  "
               f"device {args.device}  wall {time.monotonic() - started:.0f} s  "
               f"command: {' '.join(['bench/stress.py', *(argv if argv is not None else sys.argv[1:])])}")
    print()
    print(table(run, machine))
    result = summary(run)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if result["violations"]:
        print(f"\nFAIL: {len(result['violations'])} broken invariant(s):")
        for message in result["violations"]:
            print(f"  - {message}")
        print(f"\nserver log: {run.server.log_path}")
    else:
        print("\nPASS: no server deaths, no leaks, no lost records, no 5xx, "
              "every error in the documented shape")
    if not args.keep and not result["violations"]:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
