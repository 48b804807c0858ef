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

Three modules: ``store`` (the job table), ``manager`` (the server's thread that runs one job at a time
and decides its final status from the exit code) and ``child`` (the job process, ``python -m
capguard.server.evaluations run JOB_DIR``: the server starts it with its own sys.path).

Restarts: the job table is SQLite (data_dir/evaluations.db, WAL: the server and the job process write
it). A job that was running when the server stopped (shutdown, crash, kill -9) is *resumed* on the next
start: it is queued again, and its process keeps the checkpoints the earlier run finished
(``Evaluator.resume``: rows of report.json on the same data set) and captions only the rest. A job cut
``MAX_ATTEMPTS`` times is failed ("interrupted by restart ...") instead, so a job that keeps the machine
from staying up cannot loop forever. Nothing is lost silently. One server per data_dir runs the jobs.

Job ids are uuid4 hex made in store.py; every id from a request is checked against ``JOB_ID`` before it
reaches SQL or a path (``job_dir``).
"""

from capguard.server.evaluations.child import main, run_job
from capguard.server.evaluations.manager import EvaluationManager
from capguard.server.evaluations.store import (
    FINISHED,
    JOB_ID,
    MAX_ATTEMPTS,
    STATUSES,
    Job,
    JobSpec,
    JobStore,
    job_dir,
    new_job_id,
    valid_job_id,
)

__all__ = ["FINISHED", "JOB_ID", "MAX_ATTEMPTS", "STATUSES", "EvaluationManager", "Job", "JobSpec", "JobStore",
           "job_dir", "main", "new_job_id", "run_job", "valid_job_id"]
