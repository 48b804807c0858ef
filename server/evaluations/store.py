"""The evaluation job table: one SQLite row per job, written by the server and by the job process.

    store = JobStore(data_dir / "evaluations.db")
    job = store.create(spec, total=2 * 97)        # -> Job(status="queued")
    store.claim_next()                            # the oldest queued job, now running (atomic)
    store.progress(job.id, 16, 194); store.finish(job.id, "succeeded")

The table is a WAL database (server/db.py): the server and the job process write it at once. Job ids
are uuid4 hex made here; every id from a request is checked against ``JOB_ID`` before it reaches SQL
or a path (``job_dir``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from capguard.server.db import connect, transaction

JOB_ID = re.compile(r"[0-9a-f]{32}")   # uuid4().hex
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
MAX_ATTEMPTS = 3          # runs of one job (the first and resumes after restarts) before it is failed

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluation_jobs (
    id          TEXT PRIMARY KEY,        -- uuid4 hex
    status      TEXT NOT NULL,           -- queued | running | succeeded | failed | cancelled
    spec        TEXT NOT NULL,           -- JSON JobSpec: what the job process runs
    done        INTEGER NOT NULL DEFAULT 0,   -- videos captioned, over all checkpoints
    total       INTEGER NOT NULL,        -- checkpoints x videos
    error       TEXT,                    -- why it failed or was cancelled
    attempts    INTEGER NOT NULL DEFAULT 0,   -- runs started (more than 1: resumed after a restart)
    created_at  REAL NOT NULL,           -- unix seconds
    started_at  REAL,                    -- of the latest attempt
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS evaluation_jobs_by_status ON evaluation_jobs (status, created_at);
"""


def new_job_id() -> str:
    return uuid.uuid4().hex


def valid_job_id(job_id: str) -> bool:
    """Whether `job_id` can be one of ours. Example: "3f2a...(32 hex)" -> True; "../x", "ABC" -> False."""
    return isinstance(job_id, str) and JOB_ID.fullmatch(job_id) is not None


def job_dir(root: Path, job_id: str) -> Path:
    """root/<id>; ValueError for anything that is not a job id, so a crafted id never names a path."""
    if not valid_job_id(job_id):
        raise ValueError(f"not an evaluation job id: {job_id!r}")
    return Path(root) / job_id


@dataclass
class JobSpec:
    """Everything the job process needs, fixed when the job is created (job.json, the spec column)."""

    checkpoints: list[list[str]]   # [[name, absolute dir], ...] in report order; names label the rows
    dataset: str                   # as requested, relative to datasets_root (the child runs there)
    datasets_root: str             # absolute; the job process's working directory
    references: str = "auto"       # capguard.models.evaluate.load_dataset references
    limit: int | None = None       # first N videos
    num_frames: int | None = None  # None: each checkpoint's own
    max_new_tokens: int | None = None   # None: each checkpoint's own
    decoding: dict = dataclasses.field(default_factory=dict)   # capguard.models.decoding.DecodingRequest fields set
    device: str = "auto"           # the server's device setting
    decoder: str = "capguard.models.video:sample_frames"   # the server's decoder setting, "module:function"
    limits: dict = dataclasses.field(default_factory=dict)   # capguard.models.video.VideoLimits fields
    threads: int = 1               # torch threads in the job process
    nice: int = 10                 # added niceness of the job process
    # caption files instead of checkpoints (capguard.models.evaluate.captions), in report order:
    # [[name, file, videos_root, source], ...]; file relative to datasets_root (a named file) or to the job
    # dir (an upload); videos_root None: the rows' video_path values are not opened (uploads)
    captions: list[list[str | None]] = dataclasses.field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """The report's row names: the checkpoints', or the caption files'."""
        return [entry[0] for entry in self.captions or self.checkpoints]


@dataclass
class Job:
    id: str
    status: str                    # one of STATUSES
    spec: JobSpec
    done: int                      # progress: videos captioned so far, over all checkpoints
    total: int
    error: str | None
    attempts: int
    created_at: float              # unix seconds
    started_at: float | None
    finished_at: float | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class JobStore:
    """The job table. One connection under a lock per process; the job process opens its own."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = connect(self.path, SCHEMA, timeout_s=30)   # the job process may hold the lock a moment

    _COLUMNS = "id, status, spec, done, total, error, attempts, created_at, started_at, finished_at"

    @staticmethod
    def _job(row: tuple) -> Job:
        job_id, status, spec, done, total, error, attempts, created, started, finished = row
        return Job(job_id, status, JobSpec(**json.loads(spec)), done, total, error, attempts, created, started,
                   finished)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple = ()) -> int:
        """One statement (its own transaction); returns the rows it changed."""
        with self._lock:
            return self._conn.execute(sql, args).rowcount

    def create(self, spec: JobSpec, total: int, job_id: str | None = None) -> Job:
        """A queued job; job_id: one made beforehand with new_job_id (its directory is filled first)."""
        job = Job(job_id or new_job_id(), "queued", spec, 0, total, None, 0, time.time(), None, None)
        self._write(f"INSERT INTO evaluation_jobs ({self._COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (job.id, job.status, json.dumps(dataclasses.asdict(spec)), 0, total, None, 0,
                       job.created_at, None, None))
        return job

    def get(self, job_id: str) -> Job | None:
        if not valid_job_id(job_id):
            return None
        rows = self._query(f"SELECT {self._COLUMNS} FROM evaluation_jobs WHERE id = ?", (job_id,))
        return self._job(rows[0]) if rows else None

    def list(self, limit: int | None = None) -> list[Job]:
        """Newest first."""
        rows = self._query(f"SELECT {self._COLUMNS} FROM evaluation_jobs ORDER BY created_at DESC, rowid DESC"
                           " LIMIT ?", (-1 if limit is None else limit,))
        return [self._job(row) for row in rows]

    def counts(self) -> dict[str, int]:
        """{status: jobs}, every status present. Example: one job queued -> {"queued": 1, "running": 0, ...}."""
        found = dict(self._query("SELECT status, COUNT(*) FROM evaluation_jobs GROUP BY status"))
        return {status: found.get(status, 0) for status in STATUSES}

    def active(self) -> int:
        """Jobs queued or running: what the queue bound counts."""
        return self._query("SELECT COUNT(*) FROM evaluation_jobs WHERE status IN ('queued', 'running')")[0][0]

    def claim_next(self) -> Job | None:
        """The oldest queued job, now running (attempts + 1); None when none waits. Atomic."""
        with self._lock, transaction(self._conn, immediate=True):   # an error rolls the claim back
            row = self._conn.execute("SELECT id FROM evaluation_jobs WHERE status = 'queued' "
                                     "ORDER BY created_at, rowid LIMIT 1").fetchone()
            if row is not None:
                self._conn.execute("UPDATE evaluation_jobs SET status = 'running', attempts = attempts + 1, "
                                   "started_at = ?, error = NULL WHERE id = ?", (time.time(), row[0]))
        return None if row is None else self.get(row[0])

    def progress(self, job_id: str, done: int, total: int) -> None:
        self._write("UPDATE evaluation_jobs SET done = ?, total = ? WHERE id = ?", (done, total, job_id))

    def note_error(self, job_id: str, message: str) -> None:
        """The job process says why it is about to fail (the manager sets the status from its exit)."""
        self._write("UPDATE evaluation_jobs SET error = ? WHERE id = ?", (message, job_id))

    def finish(self, job_id: str, status: str, error: str | None = None) -> None:
        """A final status; succeeded also completes the progress. error None keeps what the job noted."""
        assert status in FINISHED, status
        done = "total" if status == "succeeded" else "done"
        self._write(f"UPDATE evaluation_jobs SET status = ?, error = COALESCE(?, error), done = {done}, "
                    "finished_at = ? WHERE id = ?", (status, error, time.time(), job_id))

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job that has not started; False if it is not queued (any more)."""
        return self._write("UPDATE evaluation_jobs SET status = 'cancelled', error = 'cancelled by request', "
                           "finished_at = ? WHERE id = ? AND status = 'queued'", (time.time(), job_id)) == 1

    def recover(self, max_attempts: int = MAX_ATTEMPTS) -> tuple[list[str], list[str]]:
        """Jobs left 'running' by a server that stopped: queue them again, or fail those cut max_attempts
        times. Returns (resumed ids, failed ids). Example: attempts 1 -> queued; attempts 3 -> failed."""
        with self._lock, transaction(self._conn, immediate=True):
            rows = self._conn.execute("SELECT id, attempts FROM evaluation_jobs WHERE status = 'running'"
                                      ).fetchall()
            resumed = [job_id for job_id, attempts in rows if attempts < max_attempts]
            failed = [job_id for job_id, attempts in rows if attempts >= max_attempts]
            self._conn.executemany("UPDATE evaluation_jobs SET status = 'queued' WHERE id = ?",
                                   [(i,) for i in resumed])
            self._conn.executemany(
                "UPDATE evaluation_jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                [(time.time(), f"interrupted by restart {max_attempts} times; not resumed again "
                               "(POST it again to retry)", i) for i in failed])
        return resumed, failed

    def latest_succeeded(self) -> Job | None:
        rows = self._query(f"SELECT {self._COLUMNS} FROM evaluation_jobs WHERE status = 'succeeded' "
                           "ORDER BY finished_at DESC LIMIT 1")
        return self._job(rows[0]) if rows else None

    def prune(self, keep: int) -> list[str]:
        """Delete finished jobs beyond the newest `keep` finished ones; returns their ids."""
        with self._lock, transaction(self._conn, immediate=True):
            ids = [r[0] for r in self._conn.execute(
                "SELECT id FROM evaluation_jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
                "ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?", (keep,)).fetchall()]
            self._conn.executemany("DELETE FROM evaluation_jobs WHERE id = ?", [(i,) for i in ids])
        return ids

    def close(self) -> None:
        with self._lock:
            self._conn.close()
