"""The stress run's shared parts: the plan, what it counts, /proc readings, the server process, the
run context every phase gets (bench/stress.py runs the phases).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from serving import free_port, wait_ready

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


ADMIN_TOKEN, METRICS_TOKEN = "stress-admin-token", "stress-metrics-token"
DECODE_WORKERS = 2                   # decoder processes the server is configured with
# the server's child processes: its decoders, and with CAPGUARD_ENGINE=vllm one vLLM engine core (the demo
# checkpoints' LLMs: one core per LLM directory) and the resource tracker of its spawn; they must die with the
# server like the decoders
CHILDREN = DECODE_WORKERS + 2 * (os.environ.get("CAPGUARD_ENGINE", "").strip().lower() == "vllm")
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


def stat_fields(pid: int) -> list[str] | None:
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
            fields = stat_fields(int(entry.name))
            if fields is not None and fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def is_decoder(pid: int) -> bool:
    """Whether `pid` runs capguard's decoder entry point (server/decode.py's worker_entry), from its command line."""
    try:
        return b"capguard.server.decode:worker_entry" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def is_zombie(pid: int) -> bool:
    fields = stat_fields(pid)
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
        self.worker_peak_mb = max([self.worker_peak_mb, *(memory_mb(k, "VmHWM") for k in kids if is_decoder(k))])
        if phase is not None:
            phase.peak_server_mb = max(phase.peak_server_mb, server)
            phase.peak_total_mb = max(phase.peak_total_mb, total)
        return server, total

    def stop(self) -> None:
        self._halt.set()




class Server:
    """``capguard serve`` as a subprocess: start, wait until ready, kill -9, stop."""

    def __init__(self, root: Path, checkpoint: str, data_dir: Path, log_path: Path, plan: Plan, device: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.checkpoint, self.log_path = checkpoint, log_path
        self.data_dir = data_dir
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(BENCH),
                                                                os.environ.get("PYTHONPATH")])),
                    "CAPGUARD_CHECKPOINTS_ROOT": str(root), "CAPGUARD_DATA_DIR": str(data_dir),
                    "CAPGUARD_DEVICE": device, "CAPGUARD_DECODE_WORKERS": str(DECODE_WORKERS),
                    "CAPGUARD_DECODE_TIMEOUT_S": str(plan.decode_timeout_s),
                    "CAPGUARD_DECODER": "fault_decoder:decoder",
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
        wait_ready(self.url, self.process, timeout_s - (time.monotonic() - started), self.log_tail)
        return time.monotonic() - started

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
            clean = not tmp and len(kids) == CHILDREN and not zombies and depth == 0
            if clean or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        phase.leaked_tmp += len(tmp)
        phase.leaked_workers += max(0, len(kids) - CHILDREN) + len(zombies)
        phase.queue_left += max(0, depth)
        if tmp:
            phase.violate(f"{phase.name}: temp files left in data_dir/tmp: {tmp[:5]}")
        if len(kids) != CHILDREN or zombies:
            phase.violate(f"{phase.name}: {len(kids)} decoder processes ({len(zombies)} zombies), "
                          f"expected {CHILDREN}")
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
