"""One guard per checkpoint for a whole Ray deployment, and the one caption log behind it.

With N Serve replicas, a guard inside each replica would see 1/N of the captions: its window fills N times
slower and a collapse is flagged late, or by some replicas only. Here every replica hands its batch's
captions to one ``GuardKeeper`` per checkpoint, which

1. appends them to the deployment's caption log (server/storage.py ``CaptionLog``, SQLite WAL) and returns
   only once they are committed, so a caption is on disk before any replica answers with it;
2. feeds them to the checkpoint's ``Guard`` (server/guard.py) and returns the verdicts, one per caption.

On a cluster the keeper is a named Ray actor, ``capguard-guard/<checkpoint>`` in namespace ``capguard``,
pinned to the head node (the log is one SQLite file on one disk: every writer must be on that machine)
and detached, so a replica's death does not take the window with it. ``max_restarts=-1``: when the actor
itself dies, Ray starts it again and its ``__init__`` rebuilds the window from the log (``Guard.restore``),
so nothing acknowledged is forgotten. A call in flight when it died is retried once it is back
(``max_task_retries``); if the first attempt had already committed, the log holds that caption twice, which
the guard counts once (its window is keyed by video).

The keeper is a plain class: tests and the single-process server can run it without Ray. ``import ray``
happens only inside ``guard_actor``/``guard_actors``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from capguard.server.guard import Guard, GuardSettings, GuardState
from capguard.server.storage import CaptionLog, CaptionRecord

log = logging.getLogger(__name__)

NAMESPACE = "capguard"              # Ray namespace of the deployment's named actors
ACTOR_PREFIX = "capguard-guard/"    # + checkpoint name: the guard actor's name
HEAD_RESOURCE = "node:__internal_head__"   # a resource only the head node has: pins an actor there


class GuardKeeper:
    """The rolling window of one checkpoint for all replicas, restored from and written to one caption log.

    Example: keeper = GuardKeeper("demo", "af10...", "data/capguard.db"); keeper.observe([record]) ->
    [GuardState(status="warming_up", window_captions=1, ...)]. A second keeper on the same log (a restart)
    starts with the same window.
    """

    def __init__(self, checkpoint: str, fingerprint: str, log_path: str | Path,
                 settings: GuardSettings | None = None):
        self.checkpoint, self.fingerprint = checkpoint, fingerprint
        self.settings = settings if settings is not None else GuardSettings()
        self.log = CaptionLog(log_path)
        self.guard = self._restored(fingerprint)

    def _restored(self, fingerprint: str) -> Guard:
        """A guard holding the logged window of these weights (a checkpoint whose weights changed starts anew)."""
        guard = Guard(self.checkpoint, self.settings)
        rows = self.log.recent(self.checkpoint, self.settings.window, fingerprint=fingerprint)
        guard.restore(rows)
        log.info("guard %s: restored from %d logged captions (fingerprint %s)", self.checkpoint, len(rows),
                 fingerprint[:12])
        return guard

    def observe(self, records: list[CaptionRecord]) -> list[GuardState]:
        """Commit ``records`` to the log, then observe them in order; one verdict per record.

        Records of other weights than the window's (a checkpoint directory whose files were replaced and
        reloaded by some replica) switch the window to those weights, restored from their own logged rows.
        """
        wrong = [r.checkpoint for r in records if r.checkpoint != self.checkpoint]
        if wrong:
            raise ValueError(f"guard of {self.checkpoint!r} got captions of {sorted(set(wrong))}; "
                             "send each checkpoint's captions to its own guard")
        if not records:
            return []
        self.log.append(records)   # committed before any verdict leaves, so before any replica answers
        latest = records[-1].fingerprint
        if any(r.fingerprint != self.fingerprint for r in records):
            log.warning("guard %s: weights changed (%s -> %s); window restarts from their logged captions",
                        self.checkpoint, self.fingerprint[:12], latest[:12])
            self.fingerprint = latest
            self.guard = self._restored(latest)   # the log already holds this batch: restoring observes it
            return [self.guard.state()] * len(records)
        return [self.guard.observe(r.video_sha256, r.caption, r.text_emb, r.video_emb, r.siglip) for r in records]

    def state(self) -> GuardState:
        """The verdict as of the last caption (a /metrics scrape or GET /checkpoints/{name}/guard)."""
        return self.guard.state()

    def logged(self) -> int:
        """Captions of this checkpoint in the log, all weights (audits and tests)."""
        return self.log.count(self.checkpoint)

    def close(self) -> None:
        self.log.close()


def actor_name(checkpoint: str) -> str:
    """Example: "runs/epoch-3" -> "capguard-guard/runs/epoch-3" (checkpoint names are path-like already)."""
    parts = checkpoint.split("/")
    if not re.fullmatch(r"[\w.\-/]+", checkpoint) or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"checkpoint name {checkpoint!r}: path segments of letters, digits, '.', '-', '_'")
    return ACTOR_PREFIX + checkpoint


@dataclass
class GuardActorOptions:
    """How the guard actors are placed and restarted (``ray.remote`` options)."""

    pin_to_head: bool = True   # the caption log is a file on the head node's disk: write it from there
    max_restarts: int = -1     # a dead guard comes back (and restores from the log) as often as it dies
    max_task_retries: int = 3  # a call in flight when it died is sent again once it is back


def guard_actor(checkpoint: str, fingerprint: str, log_path: str | Path, settings: GuardSettings,
                options: GuardActorOptions | None = None):
    """The deployment's named ``GuardKeeper`` actor for ``checkpoint``, created on first call.

    Every replica calls this; the first one creates the actor, the others get a handle to the same one
    (``get_if_exists``). Detached: it outlives the replica that created it; ``drop_guard_actors`` ends them.
    """
    import ray

    options = options or GuardActorOptions()
    extra = {"resources": {HEAD_RESOURCE: 0.001}} if options.pin_to_head else {}
    remote = ray.remote(GuardKeeper).options(
        name=actor_name(checkpoint), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        num_cpus=0, max_restarts=options.max_restarts, max_task_retries=options.max_task_retries,
        max_concurrency=1, **extra)   # one call at a time: observe() is a read-modify-write of the window
    return remote.remote(checkpoint, fingerprint, str(log_path), settings)


def guard_actors() -> dict[str, object]:
    """Checkpoint name -> handle of every live guard actor of the deployment (what /metrics reads)."""
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)   # live ones, straight from the GCS
    names = sorted(a["name"] for a in named if a["namespace"] == NAMESPACE and a["name"].startswith(ACTOR_PREFIX))
    return {name.removeprefix(ACTOR_PREFIX): ray.get_actor(name, namespace=NAMESPACE) for name in names}


def drop_guard_actors() -> int:
    """End every guard actor of the deployment (they are detached); returns how many. Their log stays."""
    import ray

    actors = guard_actors()
    for handle in actors.values():
        ray.kill(handle, no_restart=True)
    return len(actors)


__all__ = ["ACTOR_PREFIX", "NAMESPACE", "GuardActorOptions", "GuardKeeper", "actor_name", "drop_guard_actors",
           "guard_actor", "guard_actors"]
