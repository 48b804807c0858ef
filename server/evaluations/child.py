"""The evaluation job process: ``python -m capguard.server.evaluations run JOB_DIR``.

The server starts it per job (server/evaluations/manager.py); it can also be run by hand, to debug a
job. It reads JOB_DIR/job.json, writes its progress and, on an exception, its error to the job table,
and the report files (report.json, report.html, captions.jsonl; capguard.models.evaluate rewrites each
atomically after every checkpoint) into JOB_DIR; the server sends its output to JOB_DIR/job.log. It
gets SIGKILL when the server dies (PR_SET_PDEATHSIG), so a killed server leaves no orphan writing into
a job directory.

A job.json with a "ray" section (written by the manager of a ``--ray`` server) runs a checkpoint job as a
Ray Data sweep (``_run_sweep``): this process is then the sweep's driver, the actors caption.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from capguard.server.evaluations.store import JobSpec, JobStore, valid_job_id

log = logging.getLogger(__name__)

BATCH_SIZE = 8            # videos per model call in a job: small, so progress moves and memory stays low


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
        if meta.get("ray") and not spec.captions:   # caption-file jobs caption nothing: they run here
            return _run_sweep(job_id, spec, directory, meta["ray"], store)
        import torch

        from capguard.models.decoding import DecodingRequest
        from capguard.models.evaluate import Evaluator, component_paths, load_dataset
        from capguard.models.video import VideoLimits
        from capguard.server.decode import import_function

        torch.set_num_threads(spec.threads)
        decode = import_function(spec.decoder)
        limits = VideoLimits(**spec.limits)

        def frames(path: Path, num_frames: int, max_side: int):
            return decode(path, num_frames, limits, max_side=max_side).frames   # (T, H, W, 3) uint8

        if spec.captions:
            return _run_captions(spec, directory, frames, lambda done, total: store.progress(job_id, done, total))
        dataset = load_dataset(spec.dataset, spec.references, spec.limit)   # relative: cwd is datasets_root
        evaluator = Evaluator(dataset, directory, num_frames=spec.num_frames, batch_size=BATCH_SIZE,
                              max_new_tokens=spec.max_new_tokens, decoding=DecodingRequest(**spec.decoding),
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


def _run_sweep(job_id: str, spec: JobSpec, directory: Path, options: dict, store: JobStore) -> int:
    """The job on the server's Ray cluster (capguard.models.ray_sweep): the same units as ``Evaluator`` in
    batches of BATCH_SIZE, so the report is the local job's; a resumed job keeps JOB_DIR/sweep.jsonl's units."""
    from capguard.models.decoding import DecodingRequest
    from capguard.models.evaluate import load_dataset
    from capguard.models.ray_sweep import connect, sweep

    connect(options["address"])
    log.info("evaluation %s: a sweep on the Ray cluster at %s, %d actors", job_id, options["address"],
             options["actors"])
    sweep([path for _, path in spec.checkpoints], load_dataset(spec.dataset, spec.references, spec.limit),
          directory, actors=options["actors"], batch_size=BATCH_SIZE, num_frames=spec.num_frames,
          max_new_tokens=spec.max_new_tokens, device=spec.device, decoding=DecodingRequest(**spec.decoding),
          decoder=spec.decoder, limits=spec.limits, names=[name for name, _ in spec.checkpoints],
          progress_callback=lambda done, total: store.progress(job_id, done, total),
          cpus_per_actor=options.get("cpus_per_actor", 1.0), gpus_per_actor=options.get("gpus_per_actor"))
    return 0


def _run_captions(spec: JobSpec, directory: Path, frames, progress) -> int:
    """A caption-file job: each file is one report row (capguard.models.evaluate.captions). Uploads are read
    without their video paths (they name nothing this server may open); named files resolve theirs under
    videos_root, which the route kept inside the datasets root."""
    from capguard.models.captions_file import parse_captions, read_captions_file
    from capguard.models.evaluate.captions import evaluate_captions

    files = []
    for name, file, videos_root, source in spec.captions:
        if videos_root is None:
            files.append(parse_captions((directory / file).read_bytes(), source=source, name=name))
        else:
            files.append(read_captions_file(file, videos_root=videos_root, name=name))   # cwd: datasets_root
    evaluate_captions(files, directory, device=spec.device, num_frames=spec.num_frames or 8, frame_loader=frames,
                      progress_callback=progress)
    return 0


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
