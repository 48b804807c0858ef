"""Evaluation jobs in the server: validation, the job table, job processes, restarts, the report page.

Jobs really run (a child process per job), so the job tests are marked slow: each start imports torch
(a few seconds). A job that must stay "running" reads a data set whose first video makes the test
decoder (bench/fault_decoder.py, the server's ``decoder`` setting) sleep for an hour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import error_of
from fastapi.testclient import TestClient
from fault_decoder import HANG
from prometheus_client.parser import text_string_to_metric_families
from test_ui import browser  # noqa: F401 - the headless Chromium fixture

from capguard.server.app import create_app
from capguard.server.childproc import describe_exit
from capguard.server.errors import ApiError
from capguard.server.evaluations import MAX_ATTEMPTS, JobSpec, JobStore, job_dir, valid_job_id
from capguard.server.routes.evaluations import dataset_path
from capguard.server.settings import REPO_ROOT

ADMIN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
JOB_TIMEOUT_S = 120.0


def hangul(text: str) -> bool:
    return any("\uac00" <= ch <= "\ud7a3" for ch in text)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, video_files) -> Path:
    """A datasets root: clips/ (4 videos) + clips.jsonl (Korean references), hang/ (its first video
    hangs the test decoder), notvideo/ (nothing decodes), leak.jsonl (lists a file outside the root) and
    out -> a directory outside the root."""
    root = tmp_path_factory.mktemp("datasets")
    (root / "clips").mkdir()
    lines = []
    for i, clip in enumerate(video_files[:4]):
        (root / "clips" / clip.name).write_bytes(clip.read_bytes())
        lines.append({"id": f"c{i}", "path": f"clips/{clip.name}", "caption_ko": f"{i}층 건물을 줌인한 영상"})
    (root / "clips.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    (root / "hang").mkdir()
    (root / "hang" / "a-hang.mp4").write_bytes(HANG + b"\0" * 64)
    (root / "hang" / "b.mp4").write_bytes(video_files[0].read_bytes())
    (root / "notvideo").mkdir()
    (root / "notvideo" / "notes.mp4").write_text("these are notes, not a video\n")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.mp4").write_bytes(video_files[1].read_bytes())
    (root / "leak.jsonl").write_text(json.dumps({"id": "x", "path": str(outside / "secret.mp4")}) + "\n")
    (root / "out").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def app_overrides(datasets):
    return {"decoder": "fault_decoder:decoder", "admin_token": ADMIN, "datasets_root": datasets,
            "evaluation_max_checkpoints": 2, "evaluation_max_videos": 3}


def metric_samples(client) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(client.get("/metrics").text) for s in family.samples}


def wait_for(client, job_id: str, statuses: set[str], timeout_s: float = JOB_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/evaluations/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"evaluation still {job['status']} after {timeout_s} s: {job}"
        time.sleep(0.1)


# ------------------------------------------------------------------------------------ pure helpers


def test_job_ids_never_become_paths(tmp_path):
    good = "0123456789abcdef0123456789abcdef"
    assert valid_job_id(good) and job_dir(tmp_path, good) == tmp_path / good
    for bad in ("../" + good[3:], good.upper(), good[:-1], good + "0", f"{good[:16]}/{good[17:]}", "", ".."):
        assert not valid_job_id(bad)
        with pytest.raises(ValueError):
            job_dir(tmp_path, bad)


@pytest.mark.parametrize("name", ["../clips.jsonl", "clips/../../x", "/etc/passwd", "..\\clips.jsonl",
                                  "C:\\data\\x.jsonl", "out", "out/secret.mp4", "clips/\0"])
def test_dataset_paths_cannot_leave_the_root(datasets, name):
    with pytest.raises(ApiError) as info:
        dataset_path(datasets, name)
    assert (info.value.status, info.value.code) == (422, "dataset_outside_root")


def test_dataset_path_inside_the_root(datasets):
    assert dataset_path(datasets, "clips.jsonl") == datasets / "clips.jsonl"
    assert dataset_path(datasets, "./clips") == datasets / "clips"
    with pytest.raises(ApiError) as info:
        dataset_path(datasets, "nothing/here.jsonl")
    assert (info.value.status, info.value.code) == (404, "unknown_dataset")
    with pytest.raises(ApiError) as info:   # ".." is refused even where it would stay inside
        dataset_path(datasets, "clips/../clips.jsonl")
    assert info.value.code == "dataset_outside_root"


def test_store_lifecycle_recovery_and_pruning(tmp_path):
    store = JobStore(tmp_path / "evaluations.db")
    spec = JobSpec(checkpoints=[["demo", "/x/demo"]], dataset="val/val.jsonl", datasets_root="/x")
    first, second = store.create(spec, total=10), store.create(spec, total=4)
    assert store.counts() == {"queued": 2, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert [j.id for j in store.list()] == [second.id, first.id]   # newest first

    claimed = store.claim_next()                                    # oldest first
    assert (claimed.id, claimed.status, claimed.attempts) == (first.id, "running", 1)
    store.progress(first.id, 6, 10)
    assert (store.get(first.id).done, store.get(first.id).total) == (6, 10)
    assert store.cancel_queued(first.id) is False                  # running: not cancelled this way

    # a restart: the running job is queued again (resumed), until it has been cut MAX_ATTEMPTS times
    assert store.recover() == ([first.id], [])
    assert store.get(first.id).status == "queued" and store.get(first.id).done == 6
    for attempt in range(2, MAX_ATTEMPTS):
        assert (store.claim_next().id, store.recover()) == (first.id, ([first.id], []))
        assert store.get(first.id).attempts == attempt
    assert store.claim_next().attempts == MAX_ATTEMPTS
    assert store.recover() == ([], [first.id])
    failed = store.get(first.id)
    assert failed.status == "failed" and "interrupted by restart" in failed.error and failed.finished_at

    assert store.cancel_queued(second.id) and store.get(second.id).status == "cancelled"
    third = store.create(spec, total=2)
    store.claim_next()
    store.finish(third.id, "succeeded")
    assert store.get(third.id).done == 2 and store.latest_succeeded().id == third.id
    assert store.prune(keep=1) == [second.id, first.id] and [j.id for j in store.list()] == [third.id]
    assert store.get("../../etc/passwd") is None
    store.close()


class _FailAfterUpdate:
    """A connection that runs every statement, then raises right after the claim's UPDATE: an error
    (or a KeyboardInterrupt) that lands inside claim_next's transaction after it wrote."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql, *args):
        cursor = self.conn.execute(sql, *args)
        if sql.startswith("UPDATE evaluation_jobs SET status = 'running'"):
            raise KeyboardInterrupt
        return cursor


def test_a_failed_claim_is_rolled_back(tmp_path):
    store = JobStore(tmp_path / "evaluations.db")
    job = store.create(JobSpec(checkpoints=[["demo", "/x/demo"]], dataset="val", datasets_root="/x"), total=1)
    conn, store._conn = store._conn, _FailAfterUpdate(store._conn)
    with pytest.raises(KeyboardInterrupt):
        store.claim_next()
    store._conn = conn
    assert not conn.in_transaction   # the write lock is released: the job process can still write
    assert (store.get(job.id).status, store.get(job.id).attempts) == ("queued", 0)   # not half-claimed
    assert store.claim_next().id == job.id
    store.close()


def test_exit_codes_in_words():
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(-11) == "killed by SIGSEGV"
    assert describe_exit(1) == "exited with status 1"


def test_the_job_process_runs_as_a_module(tmp_path):
    """``python -m capguard.server.evaluations run JOB_DIR``: a directory that holds no job is refused, by name."""
    run = subprocess.run([sys.executable, "-m", "capguard.server.evaluations", "run", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "job.json" in run.stderr, run.stderr[-2000:]


# ------------------------------------------------------------------------------------- validation


def test_list_is_json_and_unknown_ids_answer_404(client):
    assert isinstance(client.get("/evaluations").json()["evaluations"], list)
    for job_id in ("0" * 32, "nope", "..%2F..%2Fetc%2Fpasswd", "A" * 32):
        assert error_of(client.get(f"/evaluations/{job_id}"), 404)["code"] in ("unknown_evaluation", "not_found")
        assert error_of(client.get(f"/evaluations/{job_id}/report.html"), 404)
    assert error_of(client.post(f"/evaluations/{'0' * 32}/cancel", headers=AUTH), 404)["code"] == \
        "unknown_evaluation"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN}])
def test_create_and_cancel_need_the_admin_token(client, headers):
    before = len(client.get("/evaluations").json()["evaluations"])
    r = client.post("/evaluations", json={"checkpoints": ["demo"], "dataset": "clips.jsonl"}, headers=headers)
    assert error_of(r, 401)["code"] == "unauthorized"
    assert error_of(client.post(f"/evaluations/{'0' * 32}/cancel", headers=headers), 401)
    assert len(client.get("/evaluations").json()["evaluations"]) == before


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"checkpoints": ["nope"], "dataset": "clips.jsonl"}, 404, "unknown_checkpoint"),
    ({"checkpoints": ["demo", "../demo"], "dataset": "clips.jsonl"}, 404, "unknown_checkpoint"),
    ({"checkpoints": ["demo"], "dataset": "../clips.jsonl"}, 422, "dataset_outside_root"),
    ({"checkpoints": ["demo"], "dataset": "/etc/passwd"}, 422, "dataset_outside_root"),
    ({"checkpoints": ["demo"], "dataset": "out/secret.mp4"}, 422, "dataset_outside_root"),
    ({"checkpoints": ["demo"], "dataset": "leak.jsonl"}, 422, "dataset_outside_root"),
    ({"checkpoints": ["demo"], "dataset": "missing.jsonl"}, 404, "unknown_dataset"),
    ({"checkpoints": ["demo"], "dataset": "clips.jsonl", "references": "en"}, 422, "bad_dataset"),
    ({"checkpoints": ["demo"], "dataset": "clips"}, 422, "too_many_videos"),         # 4 > 3
    ({"checkpoints": ["demo", "runs/epoch-1", "demo"], "dataset": "clips.jsonl"}, 422, "too_many_checkpoints"),
    ({"checkpoints": ["demo", "demo"], "dataset": "clips.jsonl"}, 422, "duplicate_checkpoint"),
    ({"checkpoints": [], "dataset": "clips.jsonl"}, 422, "invalid_request"),
    ({"checkpoints": ["demo"], "dataset": "clips.jsonl", "num_frames": 0}, 422, "invalid_request"),
    ({"checkpoints": ["demo"], "dataset": "clips.jsonl", "path": "/tmp"}, 422, "invalid_request"),
])
def test_bad_requests_queue_nothing(client, body, status, code):
    before = len(client.get("/evaluations").json()["evaluations"])
    error = error_of(client.post("/evaluations", json=body, headers=AUTH), status)
    assert error["code"] == code
    assert "/tmp/" not in error["message"] and str(REPO_ROOT) not in error["message"]   # no server paths
    assert len(client.get("/evaluations").json()["evaluations"]) == before


def test_a_full_queue_answers_503(app, client, monkeypatch):
    monkeypatch.setattr(app.state.settings, "evaluation_queue_size", 0)
    r = client.post("/evaluations", json={"checkpoints": ["demo"], "dataset": "clips.jsonl", "limit": 1},
                    headers=AUTH)
    assert error_of(r, 503)["code"] == "evaluation_queue_full" and r.headers["retry-after"] == "60"


# ---------------------------------------------------------------------------------- running jobs


@pytest.mark.slow
def test_caption_answers_while_a_job_runs_and_a_job_can_be_cancelled(app, client, video_files):
    r = client.post("/evaluations", json={"checkpoints": ["demo"], "dataset": "hang"}, headers=AUTH)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and r.headers["location"] == job["links"]["self"] == f"/evaluations/{job['id']}"
    assert valid_job_id(job["id"]) and job["progress"] == {"done": 0, "total": 2}
    running = wait_for(client, job["id"], {"running"})
    assert running["attempts"] == 1 and running["started_at"] is not None
    log = app.state.settings.data_dir / "evaluations" / job["id"] / "job.log"
    deadline = time.monotonic() + JOB_TIMEOUT_S   # the job process has its model and is decoding (forever)
    while not (log.is_file() and "loaded checkpoint demo" in log.read_text(errors="replace")):
        assert time.monotonic() < deadline, "the job process never loaded its checkpoint"
        time.sleep(0.1)
    assert metric_samples(client)[("capguard_evaluation_jobs", (("status", "running"),))] == 1

    for clip in video_files[:3]:   # the job process is busy (decoding forever): /caption is not
        started = time.perf_counter()
        answer = client.post("/caption", files={"video": (clip.name, clip.read_bytes(), "video/mp4"),
                                                "max_new_tokens": (None, "4")})
        assert answer.status_code == 200, answer.text
        assert time.perf_counter() - started < 10
    assert client.get(f"/evaluations/{job['id']}").json()["status"] == "running"
    assert error_of(client.get(f"/evaluations/{job['id']}/report.html"), 404)["code"] == "report_not_ready"

    assert client.post(f"/evaluations/{job['id']}/cancel", headers=AUTH).status_code == 200
    cancelled = wait_for(client, job["id"], {"cancelled", "failed", "succeeded"}, timeout_s=20)
    assert cancelled["status"] == "cancelled" and cancelled["error"] == "cancelled by request"
    assert cancelled["finished_at"] is not None and cancelled["report"] is None
    assert error_of(client.post(f"/evaluations/{job['id']}/cancel", headers=AUTH), 409)["code"] == \
        "evaluation_finished"
    listed = client.get("/evaluations").json()["evaluations"]
    assert (listed[0]["id"], listed[0]["status"], listed[0]["report"]) == (job["id"], "cancelled", None)


@pytest.mark.slow
def test_a_job_that_fails_says_why(client):
    r = client.post("/evaluations", json={"checkpoints": ["demo"], "dataset": "notvideo"}, headers=AUTH)
    assert r.status_code == 202, r.text
    job = wait_for(client, r.json()["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "failed"
    assert job["error"].startswith("ValueError: no video of notvideo could be decoded")
    assert job["progress"] == {"done": 1, "total": 1} and job["report"] is None


@pytest.mark.slow   # a whole evaluation job in its own process: ~11 s
def test_a_relative_data_dir_reaches_the_job_process(server_settings, datasets, tmp_path, monkeypatch):
    """The default data dir is relative ("data"); the job process runs in the datasets root, so the job
    directory it is given must not be (it once read <datasets root>/data/... and failed every job)."""
    monkeypatch.chdir(tmp_path)
    settings = server_settings(decoder="fault_decoder:decoder", datasets_root=datasets, data_dir=Path("data"),
                               admin_token=ADMIN)
    with TestClient(create_app(settings)) as client:
        r = client.post("/evaluations", json={"checkpoints": ["demo"], "dataset": "notvideo"}, headers=AUTH)
        assert r.status_code == 202, r.text
        job = wait_for(client, r.json()["id"], {"succeeded", "failed", "cancelled"})
    assert job["error"].startswith("ValueError: no video of notvideo could be decoded"), job["error"]


@pytest.mark.slow
def test_a_job_cut_by_a_restart_is_resumed(server_settings, datasets):
    settings = server_settings(decoder="fault_decoder:decoder", datasets_root=datasets)
    with TestClient(create_app(settings)) as client:
        r = client.post("/evaluations", json={"checkpoints": ["demo"], "dataset": "hang"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        wait_for(client, job_id, {"running"})
    # the app stopped with the job running (its process was stopped); a new app on the same data dir
    # resumes it, and this one's time limit then fails it
    settings = server_settings(decoder="fault_decoder:decoder", datasets_root=datasets,
                               data_dir=settings.data_dir, evaluation_timeout_s=1.0)
    with TestClient(create_app(settings)) as client:
        job = wait_for(client, job_id, {"failed", "succeeded", "cancelled"}, timeout_s=30)
        assert job["attempts"] == 2   # run again, not lost and not failed for the restart
        assert job["status"] == "failed" and "evaluation_timeout_s" in job["error"]
        assert (settings.data_dir / "evaluations" / job_id / "job.log").is_file()


@pytest.mark.slow
def test_a_resumed_job_keeps_the_checkpoints_it_finished(checkpoints_root, datasets, tmp_path, monkeypatch):
    """run_job in this process (what the job process runs): a first run finishes "demo"; the job is then
    run again with a second checkpoint, as after a restart, and keeps demo's row instead of redoing it."""
    import torch

    from capguard.server.evaluations import run_job

    monkeypatch.chdir(datasets)   # the job process runs in datasets_root
    store = JobStore(tmp_path / "evaluations.db")
    names = ["demo", "runs/epoch-1"]
    spec = JobSpec(checkpoints=[[n, str(checkpoints_root / n)] for n in names], dataset="clips.jsonl",
                   datasets_root=str(datasets), device="cpu", threads=torch.get_num_threads(), nice=0)
    job = store.create(spec, total=8)
    directory = job_dir(tmp_path / "evaluations", job.id)
    directory.mkdir(parents=True)

    def run(checkpoints: list[list[str]]) -> dict:
        meta = {"id": job.id, "db": str(store.path), "spec": {**vars(spec), "checkpoints": checkpoints}}
        (directory / "job.json").write_text(json.dumps(meta))
        assert run_job(directory) == 0
        return json.loads((directory / "report.json").read_text())

    first = run(spec.checkpoints[:1])   # cut after its first checkpoint
    again = run(spec.checkpoints)
    assert [row["name"] for row in again["checkpoints"]] == names
    assert again["checkpoints"][0] == first["checkpoints"][0]   # kept as it was (its timing too)
    assert again["run"]["created"] == first["run"]["created"]
    assert (store.get(job.id).done, store.get(job.id).total) == (8, 8)
    lines = (directory / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["checkpoint"] for line in lines) == ["demo"] * 4 + ["runs/epoch-1"] * 4
    store.close()


# ------------------------------------------------------------------ the shipped stacks, end to end


@pytest.fixture(scope="module")
def shipped_job(server_settings):
    """demo + collapsed (the shipped checkpoints) on the first 6 shipped validation videos:
    (settings, the finished job, its report.html response, metrics sampled right after). The app is
    stopped before the tests use it, so a test may start another on the same data dir (a restart)."""
    settings = server_settings(checkpoints_root=REPO_ROOT / "checkpoints", default_checkpoint="demo")
    with TestClient(create_app(settings)) as client:
        r = client.post("/evaluations", json={"checkpoints": ["demo", "collapsed"], "dataset": "val/val.jsonl",
                                              "limit": 6})
        assert r.status_code == 202, r.text
        assert r.json()["progress"] == {"done": 0, "total": 12}
        job = wait_for(client, r.json()["id"], {"succeeded", "failed", "cancelled"})
        html = client.get(f"/evaluations/{job['id']}/report.html")
        samples = metric_samples(client)
    return settings, job, html, samples


@pytest.mark.slow
def test_shipped_checkpoints_end_to_end(shipped_job):
    settings, job, html, samples = shipped_job
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == {"done": 12, "total": 12} and job["attempts"] == 1
    report = job["report"]
    assert [row["name"] for row in report["checkpoints"]] == ["demo", "collapsed"]
    assert report["dataset"]["source"] == "val/val.jsonl" and report["dataset"]["n_videos"] == 6
    # capguard.models.evaluate judges every row by the guard rules whatever n is (no warm-up offline). On 6 videos
    # the collapsed stack repeats one caption twice: unique 5/6 passes, but its top mode holds 2/6 = 0.33 of
    # the captions (> 0.2). The demo stack's 6 captions are all different.
    rows = {row["name"]: row for row in report["checkpoints"]}
    assert report["verdicts"] == {"demo": "ok", "collapsed": "collapsed"}
    assert rows["collapsed"]["tripped"] == ["top_mode_share"] and rows["collapsed"]["unique"] == 5
    assert rows["demo"]["unique"] == 6 and rows["demo"]["tripped"] == []
    assert hangul(rows["demo"]["top_mode"])

    directory = settings.data_dir / "evaluations" / job["id"]
    assert json.loads((directory / "report.json").read_text()) == report
    captions = (directory / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(captions) == 12 and all(hangul(json.loads(line)["caption"]) for line in captions)

    assert html.status_code == 200 and html.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in html.headers["content-security-policy"]
    assert html.text == (directory / "report.html").read_text(encoding="utf-8") and "<svg" in html.text

    assert samples[("capguard_evaluation_jobs", (("status", "succeeded"),))] == 1
    assert samples[("capguard_evaluation_jobs", (("status", "running"),))] == 0
    diversity = {dict(k[1])["checkpoint"]: v for k, v in samples.items() if k[0] == "capguard_evaluation_diversity"}
    assert diversity == pytest.approx({"demo": 1.0, "collapsed": 5 / 6})


@pytest.mark.slow
def test_finished_jobs_survive_a_restart(shipped_job):
    settings, job, _, _ = shipped_job
    with TestClient(create_app(settings)) as client:   # a new app on the same data dir
        listed = client.get("/evaluations").json()["evaluations"]
        assert [(j["id"], j["status"]) for j in listed] == [(job["id"], "succeeded")]
        again = client.get(f"/evaluations/{job['id']}").json()
        assert again["report"] == job["report"] and again["finished_at"] == job["finished_at"]
        assert client.get(f"/evaluations/{job['id']}/report.html").status_code == 200
        samples = metric_samples(client)
    assert samples[("capguard_evaluation_diversity", (("checkpoint", "collapsed"),))] == pytest.approx(5 / 6)
    assert samples[("capguard_evaluation_jobs", (("status", "succeeded"),))] == 1


@pytest.mark.slow
def test_report_page_shows_its_chart_in_chromium(shipped_job, browser, tmp_path):  # noqa: F811
    settings, job, _, _ = shipped_job
    page = settings.data_dir / "evaluations" / job["id"] / "report.html"
    browser.get(page.resolve().as_uri())
    svg = browser.find_element("css selector", "svg")
    assert svg.is_displayed() and svg.size["width"] > 100 and svg.size["height"] > 100
    bars = browser.find_elements("css selector", "svg rect.bar")
    points = browser.find_elements("css selector", "svg circle.point")
    assert [b.get_attribute("data-checkpoint") for b in bars] == ["demo", "collapsed"]
    assert [p.get_attribute("data-checkpoint") for p in points] == ["demo", "collapsed"]
    assert all(b.is_displayed() and b.size["height"] > 0 for b in bars)
    # the collapsed bar is red and shorter (5/6 vs 6/6)
    assert bars[1].get_attribute("fill") == "#d1495b" and bars[0].size["height"] > bars[1].size["height"]
    text = browser.find_element("tag name", "body").text
    top_mode = job["report"]["checkpoints"][0]["top_mode"]
    assert hangul(top_mode) and top_mode in text
    shot = Path(os.environ.get("CAPGUARD_REPORT_SCREENSHOT") or tmp_path / "report.png")
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
