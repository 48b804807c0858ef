"""The evaluation manager: a thread in the server that runs queued jobs one at a time, each as a child process.

    manager = EvaluationManager(store, data_dir / "evaluations", timeout_s=6 * 3600); manager.start()
    job = manager.submit(spec, total=2 * 97)     # -> Job(status="queued"); POST /evaluations answers 202
    manager.cancel(job.id); manager.stop()       # on shutdown the running job is resumed on the next start

The child is ``capguard.server.evaluations.child`` (started by server/childproc.py with the server's
sys.path). It writes progress to the job table; this thread decides the final status from its exit
code, kills it on cancel or timeout, and prunes old jobs.

On a ``--ray`` server (server/ray_serve.py sets ``ray``) the child of a checkpoint job is a Ray driver: it
joins the server's cluster and runs the job as a Ray Data sweep (capguard.models.ray_sweep) over an actor
pool instead of captioning itself. Status, progress, cancel, timeout and the report files stay as here:
stopping the child ends its sweep (Ray ends the actors of a driver that is gone).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from capguard.server.childproc import describe_exit, start_child
from capguard.server.evaluations.store import MAX_ATTEMPTS, Job, JobSpec, JobStore, job_dir, new_job_id

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0        # SIGTERM, then SIGKILL after this long
POLL_S = 0.25             # how often the manager looks at its child, cancel requests and the deadline


class EvaluationManager:
    def __init__(self, store: JobStore, root: Path, timeout_s: float, keep: int = 200,
                 on_change: Callable[[dict[str, int]], None] = lambda counts: None,
                 on_report: Callable[[dict], None] = lambda report: None, engine: str = "auto",
                 ray: dict | None = None):
        self.store = store
        self.engine = engine               # auto | hf | vllm: CAPGUARD_ENGINE of each job process
        # None: jobs caption in their process. A --ray server's {"address": GCS address, "actors": N,
        # "cpus_per_actor": c, "gpus_per_actor": g or None}: checkpoint jobs run as sweeps on that cluster
        self.ray = ray
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

    def submit(self, spec: JobSpec, total: int, files: dict[str, bytes] | None = None) -> Job:
        """Queue a job; files ({path relative to the job dir: content}, e.g. uploaded caption files) are
        written into its directory before the job exists in the table, so no job process can miss them."""
        job_id = new_job_id()
        directory = job_dir(self.root, job_id)
        directory.mkdir(parents=True)
        for relative, content in (files or {}).items():
            path = directory / relative
            if not path.resolve().is_relative_to(directory.resolve()):
                raise ValueError(f"job file {relative!r} would leave the job directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        job = self.store.create(spec, total, job_id)
        log.info("evaluation %s queued: %d %s on %s", job.id, len(spec.names),
                 "caption files" if spec.captions else "checkpoints", spec.dataset)
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
        directory = job_dir(self.root, job.id).resolve()   # absolute: the job process runs in the datasets root
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "job.json").write_text(json.dumps(
            {"id": job.id, "db": str(self.store.path.resolve()), "spec": dataclasses.asdict(job.spec),
             "ray": self.ray}, indent=1),
            encoding="utf-8")
        threads = str(job.spec.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "OPENBLAS_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
               "CAPGUARD_ENGINE": self.engine}   # the server's engine choice reaches the job's load_stack
        self._changed()
        log.info("evaluation %s: attempt %d starts", job.id, job.attempts)
        with (directory / "job.log").open("ab") as out:
            process = start_child("capguard.server.evaluations.child:main",
                                  ["run", str(directory), "--parent-pid", str(os.getpid())],
                                  cwd=job.spec.datasets_root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
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
