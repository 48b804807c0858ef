"""Evaluation jobs: capguard.models.evaluate run in the background, one job at a time, each in its own process.

    store = JobStore(data_dir / "evaluations.db")
    manager = EvaluationManager(store, data_dir / "evaluations", timeout_s=6 * 3600); manager.start()
    job = manager.submit(spec, total=2 * 97)     # -> Job(status="queued"); POST /evaluations answers 202
    store.get(job.id).progress                   # (done, total), written by the job process after each batch
    manager.stop()                               # on shutdown; the job is resumed on the next start

Why a process per job, not a thread: a job is hours of the same torch work /caption does. In a thread it
would share the server's interpreter (the GIL between batches), its torch thread pool
(``torch.set_num_threads`` is process-wide: limiting the job would limit /caption too) and its fate (an
out-of-memory kill or a decoder segfault on a damaged data set would take the server with it). A child
process gets its own torch threads (``evaluation_threads``, default 1), a lower CPU priority
(``evaluation_nice``, default 10: the kernel gives /caption's threads the cores first), its own memory,
and can be killed on cancel or timeout without leaving locks held. It costs a second copy of the models
(tens of MB for the shipped stacks) and a few seconds of imports per job. On a GPU it shares the device
(one more CUDA context).

The child is ``python -m capguard.server.evaluations run JOB_DIR`` (the server starts it with its own sys.path).
It reads JOB_DIR/job.json, writes its progress and, on an exception, its error to the job table, and the
report files (report.json, report.html, captions.jsonl; capguard.models.evaluate rewrites each atomically after
every checkpoint) into JOB_DIR; its log goes to JOB_DIR/job.log. The server's manager thread decides the
final status from the exit code. The child gets SIGKILL when the server dies (PR_SET_PDEATHSIG), so a
killed server leaves no orphan writing into a job directory.

Restarts: the job table is SQLite (data_dir/evaluations.db, WAL: the server and the job process write
it). A job that was running when the server stopped (shutdown, crash, kill -9) is *resumed* on the next
start: it is queued again, and its process keeps the checkpoints the earlier run finished
(``Evaluator.resume``: rows of report.json on the same data set) and captions only the rest. A job cut
``MAX_ATTEMPTS`` times is failed ("interrupted by restart ...") instead, so a job that keeps the machine
from staying up cannot loop forever. Nothing is lost silently. One server per data_dir runs the jobs.

Job ids are uuid4 hex made here; every id from a request is checked against ``JOB_ID`` before it
reaches SQL or a path (``job_dir``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from capguard.server.decode import describe_exit

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"[0-9a-f]{32}")   # uuid4().hex
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
MAX_ATTEMPTS = 3          # runs of one job (the first and resumes after restarts) before it is failed
BATCH_SIZE = 8            # videos per model call in a job: small, so progress moves and memory stays low
STOP_GRACE_S = 5.0        # SIGTERM, then SIGKILL after this long
POLL_S = 0.25             # how often the manager looks at its child, cancel requests and the deadline

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
    device: str = "auto"           # the server's device setting
    decoder: str = "capguard.models.video:sample_frames"   # the server's decoder setting, "module:function"
    limits: dict = dataclasses.field(default_factory=dict)   # capguard.models.video.VideoLimits fields
    threads: int = 1               # torch threads in the job process
    nice: int = 10                 # added niceness of the job process

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.checkpoints]


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SCHEMA)

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

    def create(self, spec: JobSpec, total: int) -> Job:
        job = Job(new_job_id(), "queued", spec, 0, total, None, 0, time.time(), None, None)
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
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute("SELECT id FROM evaluation_jobs WHERE status = 'queued' "
                                         "ORDER BY created_at, rowid LIMIT 1").fetchone()
                if row is not None:
                    self._conn.execute("UPDATE evaluation_jobs SET status = 'running', attempts = attempts + 1, "
                                       "started_at = ?, error = NULL WHERE id = ?", (time.time(), row[0]))
            finally:
                self._conn.execute("COMMIT")
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
        with self._lock:
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
        with self._lock:
            ids = [r[0] for r in self._conn.execute(
                "SELECT id FROM evaluation_jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
                "ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?", (keep,)).fetchall()]
            self._conn.executemany("DELETE FROM evaluation_jobs WHERE id = ?", [(i,) for i in ids])
        return ids

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# ---------------------------------------------------------------------------------------------------
# The manager: a thread in the server that runs queued jobs one at a time as child processes

# The child's whole program: the server's sys.path (so its decoder setting imports the same modules),
# then this module's main. Like capguard.server.decode, it does not re-run the server's __main__.
_BOOTSTRAP = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
              "from capguard.server.evaluations import main; sys.exit(main(['run', sys.argv[2], '--parent-pid', sys.argv[3]]))")


class EvaluationManager:
    def __init__(self, store: JobStore, root: Path, timeout_s: float, keep: int = 200,
                 on_change: Callable[[dict[str, int]], None] = lambda counts: None,
                 on_report: Callable[[dict], None] = lambda report: None):
        self.store = store
        self.root = Path(root)             # data_dir/evaluations: one directory per job
        self.timeout_s = timeout_s         # a run longer than this is killed and failed
        self.keep = keep                   # finished jobs kept
        self.on_change = on_change         # the jobs-per-status gauge
        self.on_report = on_report         # the last finished report's diversity gauge
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cancel: set[str] = set()     # running job ids whose cancel was requested
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        resumed, failed = self.store.recover()
        for job_id in resumed:
            log.warning("evaluation %s was interrupted by a restart; it is resumed", job_id)
        for job_id in failed:
            log.error("evaluation %s was interrupted by restarts %d times; marked failed", job_id, MAX_ATTEMPTS)
        latest = self.store.latest_succeeded()
        if latest is not None and (report := self.report(latest.id)) is not None:
            self.on_report(report)
        self._changed()
        self._thread = threading.Thread(target=self._loop, name="capguard-evaluations", daemon=True)
        self._thread.start()

    def submit(self, spec: JobSpec, total: int) -> Job:
        job = self.store.create(spec, total)
        job_dir(self.root, job.id).mkdir(parents=True)
        log.info("evaluation %s queued: %d checkpoints on %s", job.id, len(spec.checkpoints), spec.dataset)
        self._changed()
        self._wake.set()
        return job

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once or a running one (its process is stopped); a finished job is left as
        it is. Returns the job as it is now (a running one answers 'running' until its process is gone)."""
        if self.store.cancel_queued(job_id):
            self._changed()
        elif (job := self.store.get(job_id)) is not None and job.status == "running":
            with self._lock:
                self._cancel.add(job_id)   # seen by _run, even one claimed a moment ago
        return self.store.get(job_id)

    def report(self, job_id: str) -> dict | None:
        """report.json of a job, None until it is written (or if it cannot be read)."""
        path = job_dir(self.root, job_id) / "report.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def report_html(self, job_id: str) -> Path | None:
        path = job_dir(self.root, job_id) / "report.html"
        return path if path.is_file() else None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop the thread and the running job's process; that job stays 'running' and is resumed on start."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE_S + 10)

    # -- the manager thread ------------------------------------------------------------------------

    def _changed(self) -> None:
        try:
            self.on_change(self.store.counts())
        except Exception:  # noqa: BLE001 - a gauge must not stop the jobs
            log.exception("evaluation gauge update failed")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            job = self.store.claim_next()
            if job is None:
                self._wake.wait(timeout=5.0)   # a timeout too: a job queued by another process gets picked up
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001 - one broken job must not end the job thread
                log.exception("evaluation %s: the manager failed", job.id)
                self.store.finish(job.id, "failed", f"the server failed to run the job ({exc})")
            finally:
                with self._lock:
                    self._cancel.discard(job.id)
            self._changed()
            for job_id in self.store.prune(self.keep):
                shutil.rmtree(job_dir(self.root, job_id), ignore_errors=True)

    def _run(self, job: Job) -> None:
        directory = job_dir(self.root, job.id)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "job.json").write_text(json.dumps(
            {"id": job.id, "db": str(self.store.path.resolve()), "spec": dataclasses.asdict(job.spec)}, indent=1),
            encoding="utf-8")
        threads = str(job.spec.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "OPENBLAS_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
        sys_path = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
        self._changed()
        log.info("evaluation %s: attempt %d starts", job.id, job.attempts)
        with (directory / "job.log").open("ab") as out:
            process = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, json.dumps(sys_path), str(directory),
                                        str(os.getpid())],
                                       cwd=job.spec.datasets_root, env=env, stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                code = process.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if self._stopping.is_set():
                _terminate(process)
                log.warning("evaluation %s: stopped by shutdown; it is resumed on the next start", job.id)
                return   # status stays 'running': recover() requeues it
            with self._lock:
                cancelled = job.id in self._cancel
            if cancelled:
                _terminate(process)
                self.store.finish(job.id, "cancelled", "cancelled by request")
                log.info("evaluation %s cancelled", job.id)
                return
            if time.monotonic() > deadline:
                _terminate(process)
                self.store.finish(job.id, "failed", f"took longer than evaluation_timeout_s "
                                                    f"({self.timeout_s:g} s) and was stopped")
                log.error("evaluation %s timed out", job.id)
                return
        report = self.report(job.id)
        if code == 0 and report is not None:
            self.store.finish(job.id, "succeeded")
            log.info("evaluation %s succeeded: %s", job.id, report.get("verdicts"))
            self.on_report(report)
            return
        noted = self.store.get(job.id).error
        reason = describe_exit(code) if code != 0 else "exited without writing report.json"
        self.store.finish(job.id, "failed", None if noted else
                          f"the evaluation process {reason}; see job.log in its directory")
        log.error("evaluation %s failed: %s", job.id, noted or reason)


def _terminate(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not gone after STOP_GRACE_S."""
    process.terminate()
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------------------------------------
# The job process


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux for SIGKILL when the server goes (it cannot stop us if it was killed); elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:   # it went before the request took effect
        raise SystemExit("the server that started this evaluation is gone")


def run_job(directory: Path, parent_pid: int | None = None) -> int:
    """Run the job in `directory` (its job.json); 0 when report.json is complete, 1 on an error.

    parent_pid: the server that started this process (it dies with it); None when run by hand.
    """
    meta = json.loads((directory / "job.json").read_text(encoding="utf-8"))
    job_id, spec = meta["id"], JobSpec(**meta["spec"])
    if not valid_job_id(job_id) or directory.name != job_id:
        raise SystemExit(f"{directory}/job.json is not the job of this directory")
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    if spec.nice:
        os.nice(spec.nice)
    store = JobStore(meta["db"])
    try:
        import torch

        from capguard.models.evaluate import Evaluator, component_paths, load_dataset
        from capguard.models.video import VideoLimits
        from capguard.server.decode import import_function

        torch.set_num_threads(spec.threads)
        decode = import_function(spec.decoder)
        limits = VideoLimits(**spec.limits)

        def frames(path: Path, num_frames: int, max_side: int):
            return decode(path, num_frames, limits, max_side=max_side).frames   # (T, H, W, 3) uint8

        dataset = load_dataset(spec.dataset, spec.references, spec.limit)   # relative: cwd is datasets_root
        evaluator = Evaluator(dataset, directory, num_frames=spec.num_frames, batch_size=BATCH_SIZE,
                              device=spec.device, progress_bar=False, frame_loader=frames,
                              expected_checkpoints=len(spec.checkpoints),
                              progress_callback=lambda done, total: store.progress(job_id, done, total))
        kept = {row["name"] for row in evaluator.rows} if evaluator.resume() else set()   # rows of this job
        if kept:
            log.info("resuming: %d of %d checkpoints were finished before the restart", len(kept),
                     len(spec.checkpoints))
        store.progress(job_id, len(kept) * len(dataset.items), len(spec.checkpoints) * len(dataset.items))
        components = [component_paths(path) for _, path in spec.checkpoints]   # a bad one fails here, early
        for i, (name, path) in enumerate(spec.checkpoints):
            if name not in kept:
                evaluator.add(path, keep=set().union(*components[i + 1:]), name=name)
        evaluator.write()
        return 0
    except Exception as exc:  # noqa: BLE001 - whatever went wrong goes to the job's error
        log.exception("evaluation %s failed", job_id)
        store.note_error(job_id, f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m capguard.server.evaluations run JOB_DIR``: what the server starts per job (also by hand, to debug)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m capguard.server.evaluations", description="run one evaluation job")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="caption JOB_DIR/job.json's data set; progress goes to the job table")
    run.add_argument("job_dir", type=Path)
    run.add_argument("--parent-pid", type=int, help="die with this process (the server passes its own pid)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_job(args.job_dir.resolve(), args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
