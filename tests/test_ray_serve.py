"""capguard serve --ray (server/ray_serve.py): the model replica as a plain object; then 2 replicas on a local
cluster: one window for the collapsed checkpoint across both, and a replica killed under load."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ray_local import ray_test

REPO = Path(__file__).resolve().parent.parent
VAL = REPO / "samples" / "val"
PORT = 8123


@pytest.mark.slow   # loads the demo stack twice: ~5 s
def test_model_replica_as_plain_object_captions_like_the_stack():
    from capguard.models.stack import load_stack
    from capguard.models.video import VideoLimits, sample_frames
    from capguard.server.ray_serve import ModelReplica

    replica = ModelReplica(REPO / "checkpoints", device="cpu")
    stack = load_stack(REPO / "checkpoints" / "demo", device="cpu")
    frames = [sample_frames(VAL / f"val-0000{i}.mp4", 8, VideoLimits(), max_side=stack.frame_side).frames
              for i in range(2)]
    outputs, stages, who = asyncio.run(replica.caption(frames, [32, 32], checkpoint="demo"))
    expected, _ = stack.caption(frames, [32, 32])
    assert [o.caption for o in outputs] == [o.caption for o in expected] and who == "local"
    described = asyncio.run(replica.describe("demo"))
    assert described["fingerprint"] == stack.fingerprint and described["frame_side"] == stack.frame_side
    assert "error" in asyncio.run(replica.describe("missing"))
    with pytest.raises(ValueError):
        replica.path("../demo")


def test_model_replica_loads_with_the_servers_engine_and_compile_setting(monkeypatch):
    """A replica's process environment is the raylet's: engine and compile come from the server's settings."""
    import capguard.server.ray_serve as ray_serve

    loads, compiled = [], []
    monkeypatch.setattr(ray_serve, "load_stack", lambda path, *args, **kwargs: loads.append((path, kwargs)) or path)
    monkeypatch.setattr(ray_serve, "compile_llm", compiled.append)
    stack = asyncio.run(ray_serve.ModelReplica(REPO / "checkpoints", "cpu", engine="hf", compile=True
                                               ).get_stack("demo"))
    assert loads == [(REPO / "checkpoints" / "demo", {"engine": "hf"})] and compiled == [stack]
    asyncio.run(ray_serve.ModelReplica(REPO / "checkpoints", "cpu").get_stack("demo"))
    assert loads[-1][1] == {"engine": None} and len(compiled) == 1   # defaults: CAPGUARD_ENGINE, no compile


def post(client, video: Path, checkpoint: str = "collapsed"):
    with video.open("rb") as f:
        return client.post(f"http://127.0.0.1:{PORT}/caption", files={"video": (video.name, f, "video/mp4")},
                           data={"checkpoint": checkpoint}, timeout=120)


@pytest.fixture(scope="module")
def deployment(request, tmp_path_factory):
    """The application with 2 model replicas on port PORT, the shipped checkpoints, a fresh data dir."""
    from ray import serve

    request.getfixturevalue("ray_cluster")

    from capguard.server.ray_serve import APP_NAME, build_app
    from capguard.server.settings import Settings

    settings = Settings(checkpoints_root=REPO / "checkpoints", default_checkpoint="collapsed", device="cpu",
                        data_dir=tmp_path_factory.mktemp("data"), decode_workers=1, max_wait_ms=5.0)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    started = threading.Thread(target=serve.run, args=(build_app(settings, replicas=2, cpus_per_replica=1),),
                               kwargs={"name": APP_NAME, "route_prefix": "/"}, daemon=True)
    started.start()
    started.join(timeout=240)                  # serve.run waits forever for resources it cannot get
    assert not started.is_alive(), "the application did not start within 240 s"
    yield serve.get_app_handle(APP_NAME)
    serve.shutdown()
    from capguard.server.ray_guard import drop_guard_actors

    drop_guard_actors()   # detached: they outlive the application unless ended


@ray_test
@pytest.mark.slow
def test_collapse_flagged_within_50_captions_across_two_replicas(deployment):
    import httpx

    videos = sorted(VAL.glob("val-*.mp4"))[:50]
    statuses = []
    with httpx.Client() as client, ThreadPoolExecutor(4) as pool:
        for response in pool.map(lambda v: post(client, v), videos):
            assert response.status_code == 200, response.text
            statuses.append(response.json()["guard"]["status"])
        guard = client.get(f"http://127.0.0.1:{PORT}/checkpoints/collapsed/guard").json()
        time.sleep(2.5)                        # the gauges are read from the guard actor every 2 s
        metrics = client.get(f"http://127.0.0.1:{PORT}/metrics").text
    assert "collapsed" in statuses and guard["status"] == "collapsed" and guard["window_captions"] == 50
    flags = re.findall(r'^capguard_collapse_flag\{checkpoint="collapsed"\} (\S+)$', metrics, re.M)
    assert flags == ["1.0"]                    # one series for the whole deployment
    served = deployment.served.remote().result(timeout_s=30)["collapsed"]
    assert len(served) == 2 and sum(served.values()) == 50
    assert min(served.values()) >= 10, served  # each replica captioned a fair share


@ray_test
@pytest.mark.slow
def test_killing_a_replica_under_load_loses_no_acknowledged_caption(deployment):
    import httpx
    import ray

    from capguard.server.ray_guard import guard_actors

    logged_before = ray.get(guard_actors()["collapsed"].logged.remote())
    videos = sorted(VAL.glob("val-*.mp4"))[50:90]
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "capguard-model" in a["name"]]
    assert len(replicas) == 2

    killed = []

    def kill_one():
        time.sleep(3)                          # requests are in flight on both replicas by now
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        killed.append(replicas[0]["name"])

    killer = threading.Thread(target=kill_one)
    with httpx.Client() as client, ThreadPoolExecutor(4) as pool:
        killer.start()
        answers = list(pool.map(lambda v: post(client, v), videos))
        killer.join()
        after = post(client, VAL / "val-00095.mp4")
    assert killed and [a.status_code for a in answers] == [200] * len(videos)
    assert after.status_code == 200            # and the deployment keeps answering
    logged = ray.get(guard_actors()["collapsed"].logged.remote())
    assert logged >= logged_before + len(videos) + 1   # every acknowledged caption is in the log


def test_cli_refuses_zero_replicas(capsys):
    from capguard.server.cli import main

    assert main(["serve", "--ray", "--replicas", "0", "--checkpoint", str(REPO / "checkpoints" / "demo")]) == 2
    assert "--replicas must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--ray", "--evaluation-actors", "0", "--checkpoint", str(REPO / "checkpoints" / "demo")]) == 2
    assert "--evaluation-actors must be at least 1" in capsys.readouterr().err
