"""Evaluation jobs of a ``--ray`` server (server/ray_serve.py + server/evaluations/child.py): a POST /evaluations
job runs as a Ray Data sweep over an actor pool and reports like the local job; cancel ends its pool."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from ray_local import ray_marks

pytestmark = [*ray_marks(), pytest.mark.slow]   # a Serve application and a job process: ~1 min

REPO = Path(__file__).resolve().parent.parent
PORT = 8125
BASE = f"http://127.0.0.1:{PORT}"
TIMED = ("seconds", "timings_s")   # run timings: the only figures allowed to differ
# sampled with a seed: equal reports also show that the decoding options reached the actors
JOB = {"checkpoints": ["demo", "collapsed"], "dataset": "val/val.jsonl", "limit": 10,
       "do_sample": True, "temperature": 0.9, "seed": 11}


def comparable(report: dict) -> dict:
    """The report without what depends on when and how fast it ran."""
    rows = [{k: v for k, v in row.items() if k not in TIMED} for row in report["checkpoints"]]
    run = {k: v for k, v in report["run"].items() if k not in ("created", "updated", "seconds", "decode_seconds")}
    return {**{k: v for k, v in report.items() if k not in ("run", "checkpoints")}, "checkpoints": rows, "run": run}


@pytest.fixture(scope="module")
def deployment(request, tmp_path_factory):
    """A model replica (a job needs none: the smallest deployment) and evaluation pools of 2 actors, half a
    CPU each (the test cluster has 2 CPUs)."""
    from ray import serve

    request.getfixturevalue("ray_cluster")

    from capguard.server.ray_guard import drop_guard_actors
    from capguard.server.ray_serve import APP_NAME, build_app
    from capguard.server.settings import Settings

    settings = Settings(checkpoints_root=REPO / "checkpoints", default_checkpoint="demo", device="cpu",
                        data_dir=tmp_path_factory.mktemp("data"), decode_workers=1, datasets_root=REPO / "samples",
                        evaluation_nice=0)
    app = build_app(settings, replicas=1, cpus_per_replica=1, evaluation_actors=2, cpus_per_evaluation_actor=0.5)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    started = threading.Thread(target=serve.run, args=(app,), kwargs={"name": APP_NAME, "route_prefix": "/"},
                               daemon=True)
    started.start()
    started.join(timeout=240)                  # serve.run waits forever for resources it cannot get
    assert not started.is_alive(), "the application did not start within 240 s"
    yield settings
    serve.shutdown()
    drop_guard_actors()


def wait_for(client, job_id: str, until, timeout_s: float = 300) -> dict:
    """GET the job until ``until(body)``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"{BASE}/evaluations/{job_id}", timeout=30).json()
        if until(body):
            return body
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {body['status']} ({body['progress']}) after {timeout_s:g} s")


def local_job(spec: dict, root: Path) -> Path:
    """The same spec as a job of a server without Ray (its own store and job process); returns its directory."""
    from capguard.server.evaluations import EvaluationManager, JobSpec, JobStore, job_dir

    manager = EvaluationManager(JobStore(root / "evaluations.db"), root / "evaluations", timeout_s=600)
    manager.start()
    try:
        job = manager.submit(JobSpec(**spec), total=2 * JOB["limit"])
        deadline = time.monotonic() + 300
        while not manager.store.get(job.id).finished:
            assert time.monotonic() < deadline, "the local job did not finish within 300 s"
            time.sleep(0.3)
        assert manager.store.get(job.id).status == "succeeded", manager.store.get(job.id).error
        return job_dir(root / "evaluations", job.id)
    finally:
        manager.stop()
        manager.store.close()


def test_job_runs_on_the_actor_pool_and_reports_like_the_local_job(deployment, tmp_path):
    import httpx

    with httpx.Client() as client:
        posted = client.post(f"{BASE}/evaluations", json=JOB, timeout=60)
        assert posted.status_code == 202, posted.text
        job_id = posted.json()["id"]
        body = wait_for(client, job_id, lambda b: b["status"] in ("succeeded", "failed", "cancelled"))
    assert body["status"] == "succeeded", body["error"]
    assert body["progress"] == {"done": 20, "total": 20}   # per row: test_ray_sweep checks the callback

    directory = Path(deployment.data_dir) / "evaluations" / job_id
    meta = json.loads((directory / "job.json").read_text(encoding="utf-8"))
    assert meta["ray"]["actors"] == 2 and meta["ray"]["address"]
    swept = (directory / "sweep.jsonl").read_text(encoding="utf-8").splitlines()   # the pool's finished units
    assert len(swept) == 1 + 2 * 10 and json.loads(swept[0])["plan"]["decoding"] == {
        "do_sample": True, "temperature": 0.9, "seed": 11}

    local = local_job(meta["spec"], tmp_path)
    expected = json.loads((local / "report.json").read_text(encoding="utf-8"))
    assert comparable(body["report"]) == comparable(expected)
    assert (directory / "captions.jsonl").read_text(encoding="utf-8") == \
        (local / "captions.jsonl").read_text(encoding="utf-8")
    seeds = [json.loads(line)["seed"] for line in (local / "captions.jsonl").read_text().splitlines()]
    assert seeds == [11 + i for i in range(10)] * 2   # sampled, video i with seed + i, in both runs


def test_cancel_ends_the_job_process_and_frees_its_pool(deployment):
    import httpx
    import ray

    cpus = ray.available_resources().get("CPU", 0)
    with httpx.Client() as client:
        posted = client.post(f"{BASE}/evaluations", json={**JOB, "limit": 97}, timeout=60)
        assert posted.status_code == 202, posted.text
        job_id = posted.json()["id"]
        wait_for(client, job_id, lambda b: b["progress"]["done"] > 0)   # the pool is up and captioning
        assert ray.available_resources().get("CPU", 0) <= cpus - 0.5
        cancelled = client.post(f"{BASE}/evaluations/{job_id}/cancel", timeout=60)
        assert cancelled.status_code == 200, cancelled.text
        body = wait_for(client, job_id, lambda b: b["status"] != "running", timeout_s=60)
    assert body["status"] == "cancelled" and body["progress"]["done"] < 2 * 97
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < cpus:   # the gone driver's actors are ended by Ray
        assert time.monotonic() < deadline, "the cancelled job's actors still hold their CPUs after 60 s"
        time.sleep(0.5)
