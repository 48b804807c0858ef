"""Watching a training run: evaluate each checkpoint a run writes under a directory, once it is complete,
into one report that grows a row per epoch."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from capguard.models.config import MANIFEST_NAME
from capguard.models.evaluate.dataset import Dataset, load_dataset, natural_key
from capguard.models.evaluate.runner import Evaluator

log = logging.getLogger(__name__)


def find_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint dirs (holding capguard.json) one or two levels below directory, in natural order.

    Two levels, so both a run dir (run/epoch-N) and a training output root (out/run/epoch-N) work.
    Example: run/epoch-10, run/epoch-2 -> [run/epoch-2, run/epoch-10].
    """
    root = Path(directory)
    patterns = (f"*/{MANIFEST_NAME}", f"*/*/{MANIFEST_NAME}")
    found = {p.parent for pattern in patterns for p in root.glob(pattern)}

    def order(path: Path) -> tuple:
        return [natural_key(part) for part in path.relative_to(root).parts], path.stat().st_mtime

    return sorted(found, key=order)


def _signature(directory: Path) -> tuple | None:
    """(relative path, size, mtime_ns) of every file in a checkpoint dir; None while it cannot be read."""
    entries = []
    try:
        for path in directory.rglob("*"):
            if path.is_file():
                st = path.stat()
                entries.append((path.relative_to(directory).as_posix(), st.st_size, st.st_mtime_ns))
    except OSError:   # a file vanished between listing and stat: still being written
        return None
    return tuple(sorted(entries))


def watch(directory: str | os.PathLike, videos: str | os.PathLike | Dataset, out_dir: str | os.PathLike, *,
          interval: float = 30.0, once: bool = False, max_checkpoints: int | None = None,
          stop: threading.Event | None = None, references: str = "auto", limit: int | None = None,
          **options) -> dict:
    """Evaluate each checkpoint a training run writes under directory, extending one report.

    A checkpoint is taken once its files are unchanged (names, sizes, mtimes) between two polls
    ``interval`` seconds apart, so a half-written capguard.json or projector is never loaded. Rows already
    in out_dir/report.json for the same data set are kept, not recomputed. A checkpoint that fails to load
    is reported in the warnings and retried only if its files change. Rows are named by their path under
    directory ("mlp/epoch-3"), so several runs in one output root stay apart. Stops after
    ``max_checkpoints`` new rows, when ``stop`` is set, or (``once``) after two polls; otherwise runs until
    interrupted.
    options: Evaluator keywords (num_frames, batch_size, device, thresholds, progress_callback, ...).
    thresholds left out: each checkpoint is judged by the defaults updated by its capguard.json guard
    section, as the server does; given: they apply to every checkpoint (explicit settings win).
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"--watch {directory}: not a directory; pass the training run's output dir")
    dataset = videos if isinstance(videos, Dataset) else load_dataset(videos, references, limit)
    evaluator = Evaluator(dataset, out_dir, **options)
    kept = evaluator.resume()
    done = {Path(r["path"]).resolve() for r in evaluator.rows}
    if kept:
        log.info("kept %d rows of the earlier report in %s", kept, out_dir)
    evaluator.write()
    failed: dict[Path, tuple] = {}
    previous: dict[Path, tuple | None] = {}
    added, polls = 0, 0
    stop = stop or threading.Event()
    log.info("watching %s for checkpoints every %.0f s", root, interval)
    while not stop.is_set():
        current = {c: _signature(c) for c in find_checkpoints(root) if c.resolve() not in done}
        ready = [c for c, sig in current.items()
                 if sig is not None and previous.get(c) == sig and failed.get(c) != sig]
        previous = current
        for checkpoint in ready:
            try:
                evaluator.add(checkpoint.resolve(), name=checkpoint.relative_to(root).as_posix())
            except Exception as exc:  # noqa: BLE001 - one bad checkpoint must not end a days-long watch
                failed[checkpoint] = current[checkpoint]
                log.error("cannot evaluate %s: %s", checkpoint, exc)
                evaluator.extra_warnings.append({"code": "checkpoint_failed",
                                                 "message": f"{checkpoint} could not be evaluated: {exc}"})
                evaluator.write()
                continue
            done.add(checkpoint.resolve())
            added += 1
            if max_checkpoints is not None and added >= max_checkpoints:
                return evaluator.write()
        polls += 1
        if once and polls >= 2:
            break
        stop.wait(interval)
    return evaluator.write()
