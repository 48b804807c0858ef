"""One guard per checkpoint across replicas (server/ray_guard.py): the keeper as a plain object, then as a
named Ray actor fed by two "replicas" and killed under them."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from ray_local import ray_test

from capguard.server.guard import Guard, GuardSettings
from capguard.server.ray_guard import GuardKeeper, actor_name
from capguard.server.storage import CaptionRecord

SETTINGS = GuardSettings(window=40, min_captions=10)
# what a restore may give differently: the trips of the last observation, and the Vendi score, which is
# rescored on its own beat (every RunningVendi.SCORE_EVERY observations; reported, not a rule)
NOT_RESTORED = ("newly_tripped", "vendi_score")


def restorable(state) -> dict:
    return {k: v for k, v in state.to_dict().items() if k not in NOT_RESTORED}


def distinct(i: int) -> str:
    """A caption no other index gets, nor anything near it (edit similarity), e.g. 3 -> "77ad16e9 c9b2f8..."."""
    return " ".join(hashlib.sha256(f"{i}-{k}".encode()).hexdigest()[:8] for k in range(3))


GENERIC = "a building in the city"


def records(n: int, start: int = 0, caption=distinct, fingerprint: str = "fp-a",
            checkpoint: str = "demo") -> list[CaptionRecord]:
    """n captions of distinct videos; embeddings are unit vectors so grounding has something to rank."""
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        emb = rng.normal(size=8).astype(np.float32)
        emb /= np.linalg.norm(emb)
        out.append(CaptionRecord(checkpoint, fingerprint, f"video-{i:04d}", caption(i), 5, 0.5, emb, emb))
    return out


def test_keeper_logs_before_it_answers_and_restores_the_same_window(tmp_path):
    keeper = GuardKeeper("demo", "fp-a", tmp_path / "log.db", SETTINGS)
    for first in range(0, 30, 5):
        states = keeper.observe(records(5, first))
        assert len(states) == 5
        assert keeper.logged() == first + 5          # committed: a second connection sees them
    generic = keeper.observe(records(25, 30, caption=lambda i: GENERIC))[-1]
    assert generic.status == "collapsed" and "unique_ratio" in generic.tripped   # 16 distinct of 40

    reference = Guard("demo", SETTINGS)              # the same captions observed by one local guard
    for r in records(30) + records(25, 30, caption=lambda i: GENERIC):
        expected = reference.observe(r.video_sha256, r.caption, r.text_emb, r.video_emb, r.siglip)
    assert generic.to_dict() == expected.to_dict()

    again = GuardKeeper("demo", "fp-a", tmp_path / "log.db", SETTINGS)   # a restarted actor
    assert restorable(again.state()) == restorable(generic)


def test_keeper_switches_window_when_the_weights_change(tmp_path):
    keeper = GuardKeeper("demo", "fp-a", tmp_path / "log.db", SETTINGS)
    keeper.observe(records(12))
    assert keeper.state().window_captions == 12
    states = keeper.observe(records(3, 100, fingerprint="fp-b"))
    assert keeper.fingerprint == "fp-b"
    assert [s.window_captions for s in states] == [3, 3, 3]   # fp-a's captions are not judged with fp-b's


def test_keeper_refuses_another_checkpoints_captions(tmp_path):
    keeper = GuardKeeper("demo", "fp-a", tmp_path / "log.db", SETTINGS)
    with pytest.raises(ValueError, match="collapsed"):
        keeper.observe(records(1, checkpoint="collapsed"))


@pytest.mark.parametrize("name", ["", "../x", "a b", "ok\n"])
def test_actor_name_rejects_odd_checkpoint_names(name):
    with pytest.raises(ValueError):
        actor_name(name)


@pytest.mark.slow   # a fresh interpreter imports torch and fastapi: ~10 s, more on a busy box
def test_server_modules_do_not_import_ray():
    """Without --ray nothing imports ray: the app, the CLI, and the Ray modules until they are used."""
    code = ("import sys, capguard.server.app, capguard.server.cli, capguard.server.ray_guard, "
            "capguard.server.ray_serve, capguard.models.ray_sweep; sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# ---------------------------------------------------------------- on a local cluster


@ray_test
@pytest.mark.usefixtures("ray_cluster")
def test_two_replicas_feed_one_window_and_a_killed_actor_restores_it(tmp_path):
    import ray

    from capguard.server.ray_guard import drop_guard_actors, guard_actor, guard_actors

    log_path = tmp_path / "capguard.db"

    @ray.remote(num_cpus=0)
    class Replica:
        """Stands in for a Serve replica: gets the guard by name, sends it its own captions."""

        def __init__(self):
            self.guard = guard_actor("demo", "fp-a", log_path, SETTINGS)

        def serve(self, batch):
            return ray.get(self.guard.observe.remote(batch))

    a, b = Replica.remote(), Replica.remote()
    everything = records(30) + records(25, 30, caption=lambda i: GENERIC)
    last = None
    for i in range(0, len(everything), 5):     # alternate: each replica sees half the captions
        last = ray.get((a if i // 5 % 2 == 0 else b).serve.remote(everything[i:i + 5]))[-1]
    assert last.window_captions == 40          # one window over all 55 captions, not two of 27 or 28
    assert last.status == "collapsed"

    handle = guard_actors()["demo"]
    assert ray.get(handle.logged.remote()) == 55
    ray.kill(handle, no_restart=False)         # the actor dies; Ray restarts it, it restores from the log
    restored = ray.get(handle.state.remote(), timeout=60)
    assert restorable(restored) == restorable(last)
    after = ray.get(a.serve.remote(records(1, 55)), timeout=60)[-1]   # and keeps serving the replicas
    assert after.window_captions == 40 and ray.get(handle.logged.remote()) == 56
    assert drop_guard_actors() >= 1 and "demo" not in guard_actors()   # detached: ended explicitly
