"""The server's state, built by one function: ``init_state(settings, metrics) -> AppState``.

    state = init_state(settings, metrics)   # opens the logs, builds the pools; starts nothing
    await state.start()                     # decoders, model thread, evaluation jobs, default checkpoint
    ...                                     # routes read it through capguard.server.deps.State
    await state.close()

Everything heavy lives here, once per app (so a test's TestClient gets its own of each): the caption
log, the guards, the checkpoint registry, the decoder processes, the model thread and the evaluation
manager. The app's lifespan (server/app.py) only calls init, start and close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from capguard.models import semantic
from capguard.models.stack import CaptionStack
from capguard.models.video import VideoLimits
from capguard.server.batcher import Batcher
from capguard.server.captioning import run_batch
from capguard.server.checkpoints import Checkpoints
from capguard.server.decode import DecodePool, import_function
from capguard.server.errors import ApiError
from capguard.server.evaluations import EvaluationManager, JobStore
from capguard.server.guard import GuardRegistry, GuardSettings
from capguard.server.history import GuardHistory
from capguard.server.metrics import Metrics
from capguard.server.settings import Settings
from capguard.server.storage import CaptionLog

log = logging.getLogger(__name__)

STALE_UPLOAD_S = 3600   # temp uploads older than this were left by a killed process, whoever wrote them


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    storage: CaptionLog      # the caption log (SQLite)
    guards: GuardRegistry    # one rolling-window guard per checkpoint
    checkpoints: Checkpoints
    decoder: DecodePool      # decoder processes
    batcher: Batcher         # the model thread
    evaluations: EvaluationManager   # evaluation jobs: one at a time, each in its own process
    limits: VideoLimits      # what an upload may be, from settings
    history: GuardHistory    # the guard figures over time, per checkpoint (the page's live chart)
    preparing: int = 0       # /caption requests uploading or decoding: the batcher waits for them (event loop only)
    generating: int = 0      # /caption requests on a continuous engine's path (encode, engine, score): <= queue_size

    async def start(self) -> None:
        """Start the decoders, the model thread and the job thread; load the default checkpoint.

        A default checkpoint that cannot load is logged, not raised: /readyz answers 503 until one is activated.
        """
        await asyncio.to_thread(self.decoder.start)
        self.batcher.start()
        self.evaluations.start()
        default = self.settings.default_checkpoint
        log.info("LLM engine: %s (CAPGUARD_ENGINE / --engine; each checkpoint's load logs what it resolved to)",
                 self.settings.engine)
        try:
            await self.checkpoints.get(default)
        except ApiError as exc:
            log.error("default checkpoint %r is not available (%s); /readyz answers 503 until one is activated",
                      default, exc.message)

    async def close(self) -> None:
        """Stop everything start() started and close the databases (a running evaluation is resumed later)."""
        await asyncio.to_thread(self.evaluations.stop)
        self.evaluations.store.close()
        self.batcher.stop()
        self.decoder.close()
        self.checkpoints.close()
        self.storage.close()


def init_state(settings: Settings, metrics: Metrics) -> AppState:
    """Build the app's state from its settings; nothing runs until ``AppState.start``."""
    import_function(settings.decoder)   # a typo in the decoder setting fails here, not in every worker
    data_dir = Path(settings.data_dir)
    (data_dir / "tmp").mkdir(parents=True, exist_ok=True)
    remove_stale_uploads(data_dir / "tmp")
    storage = CaptionLog(data_dir / "capguard.db")
    guards = GuardRegistry(GuardSettings.from_options(settings.guard_options()))
    history = GuardHistory(settings.history_points, settings.history_every)
    # guard options set explicitly (env, CLI, a test's Settings) win over a checkpoint's capguard.json
    explicit = {k.removeprefix("guard_") for k in settings.model_fields_set if k.startswith("guard_")}

    def restore_guard(name: str, stack: CaptionStack) -> None:
        """On each checkpoint load: refill its guard window from the caption log of the same weights."""
        semantic.warm_up()   # kiwipiepy (content keys), ~10 s once per process: here, never on a request
        guard = guards.configure(name, {k: v for k, v in stack.config.guard.items() if k not in explicit})
        rows = storage.recent(name, settings.guard_window, fingerprint=stack.fingerprint)
        guard.restore(rows)
        history.forget(name)
        history.add(name, guard.state(), count=False)
        metrics.checkpoint_loaded(name, stack.engine_name, stack.engine.version if stack.engine else "")
        metrics.observe_guard(name, guard.state(), count_trips=False)
        log.info("checkpoint %s: guard restored from %d logged captions", name, len(rows))

    checkpoints = Checkpoints(settings.checkpoints_root, settings.default_checkpoint, settings.device,
                              on_load=restore_guard, compile=settings.compile, engine=settings.engine)
    decoder = DecodePool(settings.decode_workers, settings.decoder, settings.decode_timeout_s,
                         max_pending=settings.queue_size,
                         on_restart=lambda reason: metrics.decoder_restarts.labels(reason).inc(),
                         nice=settings.decode_nice)
    # the lambdas read `state` when the model thread calls them, by which time it exists
    batcher = Batcher(lambda jobs: run_batch(state, jobs), settings.max_batch_size, settings.max_wait_ms / 1000,
                      settings.queue_size, on_batch=metrics.batch_size.observe,
                      expect_more=lambda: state.preparing > 0, workers=settings.model_threads)
    metrics.track_queue(batcher.depth)
    evaluations = EvaluationManager(JobStore(data_dir / "evaluations.db"), data_dir / "evaluations",
                                    settings.evaluation_timeout_s, settings.evaluation_keep,
                                    on_change=metrics.observe_evaluation_jobs,
                                    on_report=metrics.observe_evaluation_report, engine=settings.engine)
    limits = VideoLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels,
                         max_duration_s=settings.max_duration_s, max_frames=settings.max_frames)
    state = AppState(settings=settings, metrics=metrics, storage=storage, guards=guards, checkpoints=checkpoints,
                     decoder=decoder, batcher=batcher, evaluations=evaluations, limits=limits, history=history)
    return state


def _owner_gone(path: Path) -> bool:
    """Whether the server process named in an upload's name (upload-<pid>-*.video) no longer runs.

    Our own pid counts as gone: at startup we have no uploads, so such a file is a killed predecessor's
    (a container's server is pid 1 on every start). Example: "upload-4242-x.video" -> True once 4242 is gone.
    """
    pid = path.name.split("-")[1]
    if not pid.isdigit():
        return False   # no owner in the name: only the age rule applies
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:   # alive, another user's
        pass
    return False


def remove_stale_uploads(tmp_dir: Path) -> None:
    """Remove the uploads a killed server left: its pid is gone (or is ours), or the file is an hour old.

    Uploads of another live server sharing this data dir are kept (same pid namespace assumed).
    """
    cutoff = time.time() - STALE_UPLOAD_S
    for path in tmp_dir.glob("upload-*"):
        try:
            if _owner_gone(path) or path.stat().st_mtime < cutoff:
                path.unlink()
                log.info("removed %s, an upload left by a server that was killed", path.name)
        except OSError:
            pass
