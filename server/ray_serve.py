"""``capguard serve --ray``: the same HTTP API on Ray Serve, with model replicas and one guard per checkpoint.

    capguard serve --ray auto --replicas 2     # or: serve.run(build_app(Settings(), replicas=2))

One application, two deployments:

- ``capguard`` (ingress, one replica, no CPU reserved): the FastAPI app of ``create_app`` with its routes,
  errors, /metrics names, upload limits and decoder processes (decoding stays on CPU, next to the upload).
  Its checkpoint registry loads no weights: a ``RemoteStack`` carries a checkpoint's config, fingerprint and
  frame size, read from a model replica, and its ``caption`` is a call to the model deployment. Its caption
  log is the deployment's (``DeploymentLog``): each batch goes to the checkpoint's guard actor
  (server/ray_guard.py), which commits it to the one SQLite log on the head node and observes it, before
  the ingress answers. So every replica's captions feed one window, and ``collapse_flag`` is one series per
  checkpoint for the whole deployment (the gauges are refreshed from the guard actors every few seconds).
- ``capguard-model`` (``--replicas N``, one GPU each when the cluster has GPUs): ``ModelReplica`` holds up
  to ``max_models`` loaded stacks, multiplexed by checkpoint name (``@serve.multiplexed``; the ingress sets
  the model id), and captions a batch of decoded videos.

Evaluation jobs (POST /evaluations) are queued, tracked and cancelled by the ingress's EvaluationManager as on
one machine, but a checkpoint job's process joins this cluster and runs the job as a Ray Data sweep
(capguard.models.ray_sweep) over its own actor pool (``evaluation_actors``, each holding one loaded stack):
same report, progress in the same job table, cancel stops that process and so its actors. The pool needs
resources of its own beside the replicas' (a CPU, or a GPU when the cluster has GPUs, per actor); until the
cluster has them the job stays at 0 done.

A replica that dies mid-batch costs a retry on another one: nothing was logged for that batch, so nothing
acknowledged is lost. The batching, the collapse policy and the metrics are the single-process server's
own (server/captioning.py runs unchanged): only where the model runs and where the log lives differ.

``import ray`` happens only in this module and server/ray_guard.py; ``ModelReplica`` also runs as a plain
object (its unit test has no cluster).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capguard.models.config import CheckpointConfig
from capguard.models.stack import CaptionOutput, compile_llm, load_stack
from capguard.server.checkpoints import CHECKPOINT_NAME, Checkpoints
from capguard.server.errors import ApiError
from capguard.server.guard import GuardSettings, GuardState
from capguard.server.ray_guard import guard_actor
from capguard.server.settings import Settings
from capguard.server.state import AppState, init_state
from capguard.server.storage import CaptionRecord

log = logging.getLogger(__name__)

APP_NAME = "capguard"                 # the Serve application
MODEL_DEPLOYMENT = "capguard-model"   # the model replicas
MODEL_RETRIES = 3                     # a batch whose replica died is sent again (to another replica)
GUARD_REFRESH_S = 2.0                 # how often /metrics' guard gauges are read from the guard actors
CALL_TIMEOUT_S = 300.0                # a model or guard call that takes longer fails the batch (503 to clients)


# ---------------------------------------------------------------------------------------------------
# Model replicas


class ModelReplica:
    """Loaded stacks by checkpoint name, captioning batches of decoded frames. Runs as a Serve deployment
    (``model_deployment``) or as a plain object: ``await ModelReplica(root).caption(frames, [32], "demo")``."""

    def __init__(self, checkpoints_root: str | Path, device: str = "auto", threads: int = 1,
                 engine: str | None = None, compile: bool = False):
        import torch

        torch.set_num_threads(threads)    # replicas, not OpenMP, share the cores out
        self.root, self.device = Path(checkpoints_root).resolve(), device
        # the server's settings, not the replica process's environment (a Ray worker's is the raylet's)
        self.engine, self.compile = engine, compile
        self.lock = asyncio.Lock()        # one model call at a time per replica (the ingress batches)
        self.videos = 0                   # videos captioned by this replica (tests, logs)

    def path(self, name: str) -> Path:
        """The checkpoint's directory under the root; ValueError otherwise (the ingress checked it already)."""
        path = (self.root / name).resolve()
        if not CHECKPOINT_NAME.fullmatch(name) or not path.is_relative_to(self.root):
            raise ValueError(f"no checkpoint named {name!r} under {self.root}")
        return path

    async def get_stack(self, name: str):
        """Load ``name`` (the deployment wraps this in ``@serve.multiplexed``: an LRU of loaded stacks)."""
        return await asyncio.to_thread(self._load, self.path(name), name)

    def _load(self, path: Path, name: str):
        stack = load_stack(path, self.device, None, True, name, engine=self.engine)
        if self.compile:
            compile_llm(stack)   # as Checkpoints does with settings.compile (CAPGUARD_COMPILE)
        return stack

    def _model_id(self, checkpoint: str | None) -> str:
        if checkpoint is not None:
            return checkpoint
        from ray import serve

        return serve.get_multiplexed_model_id()

    async def describe(self, checkpoint: str | None = None) -> dict:
        """What the ingress needs of a checkpoint without loading it: fingerprint, frame size, device;
        {"error": ...} when it cannot be loaded (a broken checkpoint is a 422, not a dead replica)."""
        name = self._model_id(checkpoint)
        try:
            stack = await self.get_stack(name)
        except Exception as exc:  # noqa: BLE001 - reported to the ingress, which answers 422
            log.error("checkpoint %s failed to load: %s", name, exc)
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"name": name, "directory": str(stack.directory), "fingerprint": stack.fingerprint,
                "frame_side": stack.frame_side, "device": str(stack.device), "dtype": str(stack.dtype)}

    async def caption(self, videos: list[np.ndarray], max_new_tokens: list[int] | None = None,
                      checkpoint: str | None = None, generation=None
                      ) -> tuple[list[CaptionOutput], dict[str, float], str]:
        """One batch of (T, H, W, 3) uint8 videos -> (outputs, seconds per stage, this replica's id).

        max_new_tokens, generation: as ``CaptionStack.caption`` takes them (generation: one GenerationConfig
        per video, each request's decoding options applied)."""
        stack = await self.get_stack(self._model_id(checkpoint))
        async with self.lock:
            outputs, stages = await asyncio.to_thread(stack.caption, videos, max_new_tokens, generation)
        self.videos += len(videos)
        return outputs, stages, replica_id()


def replica_id() -> str:
    """This Serve replica's id, or "local" outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica (a plain object in a test)
        return "local"


# ---------------------------------------------------------------------------------------------------
# The ingress side: checkpoints without weights, the deployment's log and guards


@dataclass
class RemoteStack:
    """Stands in for a CaptionStack in the ingress: what the routes and the batcher read, and ``caption``."""

    name: str
    directory: Path
    config: CheckpointConfig
    fingerprint: str
    frame_side: int
    device: str
    dtype: str
    model: object = field(repr=False)                         # DeploymentHandle of the model replicas
    served: Counter = field(default_factory=Counter, repr=False)   # replica id -> videos it captioned
    # no engine in the ingress: its batches go whole to a model replica (the batched path), whichever engine
    # that replica runs; capguard_engine_info says "ray-replica" for these checkpoints
    engine: None = None
    engine_name: str = "ray-replica"

    @property
    def projector_type(self) -> str:
        return self.config.projector.type

    def caption(self, videos: list[np.ndarray], max_new_tokens: list[int] | None = None, generation=None):
        """The model step on a model replica (called on the ingress's model thread); retried on a replica
        that died, since nothing of this batch is logged yet."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        handle = self.model.options(multiplexed_model_id=self.name)
        for attempt in range(1, MODEL_RETRIES + 1):
            try:
                outputs, stages, replica = handle.caption.remote(videos, max_new_tokens, generation=generation
                                                                 ).result(timeout_s=CALL_TIMEOUT_S)
                self.served[replica] += len(videos)
                return outputs, stages
            except (RayActorError, ActorUnavailableError) as exc:
                if attempt == MODEL_RETRIES:
                    raise
                log.warning("model replica lost during a batch of %s (%s); retrying (%d/%d)", self.name,
                            type(exc).__name__, attempt, MODEL_RETRIES - 1)
                time.sleep(0.5 * attempt)


class RemoteCheckpoints(Checkpoints):
    """The ingress's checkpoint registry: names, activation and 404s as usual; loading asks a model replica."""

    def __init__(self, base: Checkpoints, model, guards: DeploymentGuards):
        super().__init__(base.root, base.default, base.device, on_load=base.on_load)
        base.close()                          # its loader thread: this registry has its own
        self.model, self.guards = model, guards

    def load_blocking(self, name: str) -> RemoteStack:
        if name in self._stacks:
            return self._stacks[name]
        path = self.path(name)
        described = self.model.options(multiplexed_model_id=name).describe.remote().result(timeout_s=CALL_TIMEOUT_S)
        if "error" in described:
            raise ApiError(422, "checkpoint_error", f"checkpoint {name!r} cannot be loaded: {described['error']}")
        stack = RemoteStack(name, path, CheckpointConfig.load(path), described["fingerprint"],
                            described["frame_side"], described["device"], described["dtype"], self.model)
        self.on_load(name, stack)            # the local guard is configured with the checkpoint's thresholds
        self.guards.attach(name, stack.fingerprint)
        self._stacks[name] = stack
        return stack


class RemoteGuard:
    """The ingress's view of one guard actor: its last verdict, and the verdicts of the batch being logged."""

    def __init__(self, actor, state: GuardState):
        self.actor, self.last = actor, state
        self.pending: dict[str, list[GuardState]] = {}   # video sha256 -> verdicts logged, not yet handed out

    def state(self) -> GuardState:
        return self.last

    def observe(self, video_sha256: str, caption: str, *args, **kwargs) -> GuardState:
        """The verdict the guard actor gave this video's caption when ``DeploymentLog.append`` sent it."""
        return self.pending[video_sha256].pop(0)


class DeploymentGuards:
    """``state.guards`` of the ingress: the guard actors of the checkpoints it has loaded (by name)."""

    def __init__(self, local, log_path: Path, metrics):
        self.local, self.log_path, self.metrics = local, log_path, metrics   # local: the GuardRegistry
        self.remote: dict[str, RemoteGuard] = {}
        self.lock = threading.Lock()

    def attach(self, name: str, fingerprint: str) -> RemoteGuard:
        import ray

        settings: GuardSettings = self.local.get(name).settings   # defaults + the checkpoint's own thresholds
        actor = guard_actor(name, fingerprint, self.log_path, settings)
        guard = RemoteGuard(actor, ray.get(actor.state.remote(), timeout=CALL_TIMEOUT_S))
        with self.lock:
            self.remote[name] = guard
        self.metrics.observe_guard(name, guard.last, count_trips=False)
        return guard

    def get(self, name: str):
        with self.lock:
            return self.remote.get(name) or self.local.get(name)

    def refresh(self) -> None:
        """Read every guard actor's verdict into the gauges: other ingresses' captions count too."""
        import ray

        with self.lock:
            guards = dict(self.remote)
        states = ray.get([g.actor.state.remote() for g in guards.values()], timeout=CALL_TIMEOUT_S)
        for (name, guard), state in zip(guards.items(), states, strict=True):
            guard.last = state
            self.metrics.observe_guard(name, state, count_trips=False)


class DeploymentLog:
    """``state.storage`` of the ingress: a batch's records go to their checkpoint's guard actor, which commits
    them to the deployment's log and observes them; the verdicts wait in the RemoteGuard for ``observe``."""

    def __init__(self, local, guards: DeploymentGuards):
        self.local, self.guards = local, guards   # local: the ingress's own CaptionLog (closed with it)

    def append(self, records: list[CaptionRecord]) -> None:
        import ray

        for name in dict.fromkeys(r.checkpoint for r in records):
            mine = [r for r in records if r.checkpoint == name]
            guard = self.guards.get(name)
            states = ray.get(guard.actor.observe.remote(mine), timeout=CALL_TIMEOUT_S)   # committed on return
            for record, state in zip(mine, states, strict=True):
                guard.pending.setdefault(record.video_sha256, []).append(state)
            guard.last = states[-1]

    def recent(self, *args, **kwargs) -> list[dict]:
        return self.local.recent(*args, **kwargs)

    def count(self, checkpoint: str | None = None) -> int:
        return self.local.count(checkpoint)

    def close(self) -> None:
        self.local.close()


def use_ray(state: AppState, model, evaluation: dict | None = None) -> threading.Event:
    """Turn a freshly built AppState (nothing started) into the Ray ingress's; returns the refresher's stop.

    evaluation: the pool of each evaluation job ({"actors": N, "cpus_per_actor": c, "gpus_per_actor": g});
    its jobs join this process's cluster."""
    import ray

    state.evaluations.ray = {"actors": 2, "cpus_per_actor": 1.0, "gpus_per_actor": None, **(evaluation or {}),
                             "address": ray.get_runtime_context().gcs_address}
    log_path = Path(state.settings.data_dir).resolve() / "capguard.db"
    guards = DeploymentGuards(state.guards, log_path, state.metrics)
    state.guards = guards
    state.storage = DeploymentLog(state.storage, guards)
    state.checkpoints = RemoteCheckpoints(state.checkpoints, model, guards)
    stop = threading.Event()

    def refresh_forever() -> None:
        while not stop.wait(GUARD_REFRESH_S):
            try:
                guards.refresh()
            except Exception as exc:  # noqa: BLE001 - a restarting guard actor: the next round reads it
                log.warning("guard gauges not refreshed: %s", exc)

    threading.Thread(target=refresh_forever, name="capguard-guard-refresh", daemon=True).start()
    return stop


class CaptionIngress:
    """The ingress deployment: ``create_app(settings)`` whose state is made Ray's by ``use_ray``."""

    def __init__(self, model, settings: Settings, evaluation: dict | None = None):
        self.model, self.settings, self.evaluation = model, settings, evaluation
        self.state: AppState | None = None

    def __serve_build_asgi_app__(self):
        from capguard.server.app import create_app

        app = create_app(self.settings)

        @asynccontextmanager
        async def lifespan(app):
            self.state = init_state(app.state.settings, app.state.metrics)
            stop = use_ray(self.state, self.model, self.evaluation)
            app.state.capguard = self.state
            try:
                await self.state.start()
                yield
            finally:
                stop.set()
                await self.state.close()

        app.router.lifespan_context = lifespan
        return app

    def served(self) -> dict[str, dict[str, int]]:
        """Checkpoint -> model replica id -> videos it captioned, as seen by this ingress (tests, audits)."""
        if self.state is None:
            return {}
        checkpoints = self.state.checkpoints
        loaded = {name: checkpoints.loaded(name) for name in checkpoints.names()}
        return {name: dict(stack.served) for name, stack in loaded.items() if stack is not None}


# ---------------------------------------------------------------------------------------------------
# Building and running the application


def build_app(settings: Settings, replicas: int = 2, max_models: int = 2, gpus_per_replica: float | None = None,
              cpus_per_replica: float = 1.0, evaluation_actors: int = 2, cpus_per_evaluation_actor: float = 1.0,
              gpus_per_evaluation_actor: float | None = None):
    """The Serve application (ingress bound to the model deployment); ``serve.run`` it.

    evaluation_actors, cpus_per_evaluation_actor, gpus_per_evaluation_actor: each evaluation job's actor pool
    (gpus None: 1 per actor when the cluster has GPUs)."""
    import ray
    from ray import serve

    if replicas < 1 or evaluation_actors < 1:
        raise ValueError(f"replicas and evaluation_actors must be at least 1, got {replicas} and {evaluation_actors}")
    if gpus_per_replica is None:
        gpus_per_replica = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0

    class Model(ModelReplica):
        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_stack(self, name: str):
            return await ModelReplica.get_stack(self, name)

    # one batch per replica at a time, and as many batches in flight as replicas: a replica that is busy makes
    # the router send the next batch of the same checkpoint to another one (multiplexing prefers replicas that
    # hold the checkpoint already, so with room for more it would send them all to the first)
    settings = settings.model_copy(update={"model_threads": max(settings.model_threads, replicas)})
    model = serve.deployment(Model, name=MODEL_DEPLOYMENT, num_replicas=replicas, max_ongoing_requests=1,
                             ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica})
    ingress = serve.deployment(serve.ingress()(CaptionIngress), name=APP_NAME, num_replicas=1,
                               ray_actor_options={"num_cpus": 0})
    device = settings.device if gpus_per_replica or settings.device != "auto" else "cpu"
    evaluation = {"actors": evaluation_actors, "cpus_per_actor": cpus_per_evaluation_actor,
                  "gpus_per_actor": gpus_per_evaluation_actor}
    return ingress.bind(model.bind(str(settings.checkpoints_root), device, engine=settings.engine,
                                   compile=settings.compile), settings, evaluation)


def build(args: dict):
    """Application builder for a Serve config file (KubeRay's RayService): settings from CAPGUARD_* variables,
    ``args``: replicas, max_models, evaluation_actors. Example: import_path capguard.server.ray_serve:build,
    args {replicas: 2}."""
    return build_app(Settings(), replicas=int(args.get("replicas", 2)), max_models=int(args.get("max_models", 2)),
                     evaluation_actors=int(args.get("evaluation_actors", 2)))


def serve_forever(settings: Settings, address: str | None, replicas: int, host: str, port: int,
                  evaluation_actors: int = 2) -> int:
    """``capguard serve --ray``: join (or start) a cluster, run the application on host:port until Ctrl-C."""
    from ray import serve

    from capguard.models.ray_sweep import connect

    connect(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings, replicas=replicas, evaluation_actors=evaluation_actors), name=APP_NAME,
              route_prefix="/")
    log.info("capguard on Ray Serve: http://%s:%d (%d model replicas); Ctrl-C stops it", host, port, replicas)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
    return 0


__all__ = ["APP_NAME", "MODEL_DEPLOYMENT", "CaptionIngress", "DeploymentGuards", "DeploymentLog", "ModelReplica",
           "RemoteCheckpoints", "RemoteStack", "build", "build_app", "serve_forever", "use_ray"]
