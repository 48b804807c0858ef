"""Server settings: one pydantic-settings class, read from ``CAPGUARD_*`` environment variables.

    CAPGUARD_DEFAULT_CHECKPOINT=runs/epoch-3 CAPGUARD_ADMIN_TOKEN=s3cret capguard serve

Tests build ``Settings(...)`` directly and pass it to ``create_app``. Sizes are bytes, times seconds
unless the name says otherwise (``max_wait_ms``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from capguard.models import rules
from capguard.models.rules import GuardThresholds

REPO_ROOT = Path(__file__).resolve().parent.parent


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (a container's --cpus, a k8s limit).

    Example: 64 CPUs in the affinity mask and cpu.max "400000 100000" -> 4; "max 100000" -> 64.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:
        fields = (cgroup_root / "cpu.max").read_text().split()              # cgroup v2: "QUOTA PERIOD" or "max ..."
        if len(fields) == 2 and fields[0] != "max":
            quota = int(fields[0]) / int(fields[1])
    except (OSError, ValueError, ZeroDivisionError):
        try:                                                                 # cgroup v1
            q = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
            quota = q / period if q > 0 and period > 0 else None
        except (OSError, ValueError):
            pass
    if quota is not None and quota > 0:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CAPGUARD_", extra="forbid")

    # --- checkpoints
    checkpoints_root: Path = REPO_ROOT / "checkpoints"  # dirs holding capguard.json (1-2 levels down) are servable
    default_checkpoint: str = "demo"         # name under checkpoints_root; loaded at start, serves by default
    device: str = "auto"                     # "auto" (cuda if present), "cpu", "cuda:1", ...
    # the LLM engine (capguard.models.engines): "auto" takes vllm when it is installed and supports the LLM
    # (make install-vllm), else hf (transformers generate); vLLM's own knobs: CAPGUARD_VLLM_* (README)
    engine: Literal["auto", "hf", "vllm"] = "auto"

    # --- storage
    data_dir: Path = Path("data")            # capguard.db (caption log) and tmp/ (uploads in flight)

    # --- upload and decode limits (a bad upload must cost little and harm no one else)
    max_upload_bytes: int = Field(512 * 2**20, ge=1)   # enforced while the body streams in (413)
    max_pixels: int = Field(3840 * 2160, ge=1)         # width * height from the header: 4K at most
    max_duration_s: float = Field(600.0, gt=0)         # longer videos are refused before decoding
    max_frames: int = Field(100_000, ge=1)             # frames declared or counted (a tiny file can claim millions)
    decode_workers: int = Field(2, ge=1)               # decoder processes; a crash kills one, never the server
    decode_timeout_s: float = Field(30.0, gt=0)        # a stuck decode answers 504 and its process is replaced
    # niceness of the decoder processes: decoding is the one stage whose queueing costs a request little, so on
    # a busy box the CPU goes first to the event loop, the model thread and the engine (bench/RESULTS.md)
    decode_nice: int = Field(5, ge=0, le=19)
    decoder: str = "capguard.models.video:sample_frames"        # "module:function" the workers call; tests swap in crashers

    # --- batching
    max_batch_size: int = Field(8, ge=1)     # videos per stack.caption call
    model_threads: int = Field(1, ge=1)      # batches run side by side (server/batcher.py); see bench/RESULTS.md
    # torch.compile each checkpoint's LLM at load (capguard.models.stack.compile_llm): faster generate, 20-64 s more per
    # load on a 2-core CPU; with model_threads 1 (compiled code is warmed up on one thread)
    compile: bool = False
    # how long a batch waits for company after its first request (only while other requests are uploading or
    # decoding: a lone request never waits); 30 measured best at c4-c8 on the demo stack (bench/RESULTS.md)
    max_wait_ms: float = Field(30.0, ge=0)
    queue_size: int = Field(64, ge=1)        # requests waiting for the model (and for a decoder) before 503

    # torch threads of the server process (the model thread's matrix products). None: OMP_NUM_THREADS when it is
    # set, else the CPUs (affinity, cgroup quota) the decoder processes leave free, at least 1: on 2 cores the second
    # OpenMP thread would fight the decoders and the event loop for a core (bench/RESULTS.md)
    torch_threads: int | None = Field(None, ge=1)

    # --- HTTP front end (uvicorn): "auto" takes httptools and uvloop (C parser, libuv loop) when installed,
    # which leaves more of the GIL to the model thread (bench/RESULTS.md); h11/asyncio are the pure-Python ones
    http: Literal["auto", "h11", "httptools"] = "auto"
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    # --- access
    # the address `capguard serve` binds; on any but a loopback one (127.0.0.1, ::1, localhost) admin routes
    # need admin_token: without one they answer 403 (server/deps.py), so a server on a network is never open
    host: str = "127.0.0.1"
    admin_token: SecretStr | None = None     # Bearer token for admin routes; None: open on a loopback host only
    metrics_token: SecretStr | None = None   # Bearer token for /metrics; None: open
    cors_origins: list[str] = []             # CORS is off unless origins are listed (JSON list in the env var)

    # --- evaluation jobs (server/evaluations/: one at a time, each in its own process)
    datasets_root: Path = REPO_ROOT / "samples"        # POST /evaluations names data sets relative to this dir
    evaluation_max_checkpoints: int = Field(16, ge=1)  # checkpoints per job (each one is a full pass)
    evaluation_max_videos: int = Field(2000, ge=1)     # videos per job after `limit` (per caption file)
    evaluation_max_captions_bytes: int = Field(16 * 2**20, ge=1)   # a job's uploaded caption files together, or each named one
    evaluation_queue_size: int = Field(8, ge=1)        # queued + running jobs before POST answers 503
    evaluation_threads: int = Field(1, ge=1)           # torch threads of the job process (the server keeps its own)
    evaluation_nice: int = Field(10, ge=0, le=19)      # the job process's niceness: /caption comes first on the CPU
    evaluation_timeout_s: float = Field(6 * 3600, gt=0)   # a job running longer is killed and failed
    evaluation_keep: int = Field(200, ge=1)            # finished jobs kept (rows and report files); older ones go

    # --- guard (passed to capguard.server.guard.GuardSettings; defaults and their reasons: capguard.models.rules)
    guard_window: int = Field(rules.WINDOW, ge=1)               # captions of distinct videos in the rolling window
    guard_min_captions: int = Field(rules.MIN_CAPTIONS, ge=1)   # no verdict before this many
    guard_min_unique_ratio: float = Field(GuardThresholds.min_unique_ratio, ge=0, le=1)
    guard_min_near_unique_ratio: float = Field(GuardThresholds.min_near_unique_ratio, ge=0, le=1)
    guard_max_top_mode_share: float = Field(GuardThresholds.max_top_mode_share, ge=0, le=1)
    guard_min_grounding_r1: float = Field(GuardThresholds.min_grounding_r1, ge=0, le=1)
    guard_min_content_unique_ratio: float = Field(GuardThresholds.min_content_unique_ratio, ge=0, le=1)
    guard_max_degenerate_share: float = Field(GuardThresholds.max_degenerate_share, ge=0, le=1)
    guard_near_dup_threshold: float = Field(rules.NEAR_DUP_THRESHOLD, gt=0, le=1)
    guard_clear_after: int = Field(rules.CLEAR_AFTER, ge=1)     # passing evaluations before a tripped rule clears
    guard_recompute_every: int | None = Field(None, ge=1)   # None: the guard's auto pacing
    # what a collapsed checkpoint does: "flag" serves and says so, "reject" answers 503,
    # "fallback" serves from the most recently active checkpoint that is not collapsed
    collapse_policy: Literal["flag", "reject", "fallback"] = "flag"
    # the live chart's history (server/history.py): a point every N captions, the last M points per checkpoint
    history_every: int = Field(1, ge=1)
    history_points: int = Field(500, ge=1, le=100_000)

    @model_validator(mode="after")
    def _guard_window_holds_a_verdict(self) -> Settings:
        if self.guard_min_captions > self.guard_window:
            raise ValueError(f"guard_min_captions ({self.guard_min_captions}) exceeds guard_window "
                             f"({self.guard_window}): the guard would never reach a verdict")
        return self

    def resolved_torch_threads(self) -> int | None:
        """Threads to give torch, or None to leave it to OMP_NUM_THREADS.

        Example: 8 usable CPUs, decode_workers=2, no OMP_NUM_THREADS -> 6; 2 CPUs -> 1; torch_threads=4 -> 4.
        """
        if self.torch_threads is not None:
            return self.torch_threads
        if os.environ.get("OMP_NUM_THREADS"):
            return None
        return max(1, available_cpus() - self.decode_workers)

    def guard_options(self) -> dict[str, float | int]:
        """The guard_* fields without their prefix, for GuardSettings.from_options.

        Example: Settings().guard_options() -> {"window": 100, "min_captions": 30, "min_unique_ratio": 0.5, ...}.
        """
        return {name.removeprefix("guard_"): getattr(self, name)
                for name in type(self).model_fields if name.startswith("guard_")}
