"""Dynamic batching, back-pressure, the caption log across restarts, collapse policies, readiness."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from capguard.models.stack import load_stack
from capguard.models.video import sample_frames, sample_indices
from capguard.server.app import create_app
from capguard.server.storage import CaptionLog

ADMIN = "admin-secret"


def post(client, path, **fields):
    files = {"video": (path.name, path.read_bytes(), "video/mp4")}
    files.update({k: (None, str(v)) for k, v in fields.items()})
    return client.post("/caption", files=files)


def samples(client) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(client.get("/metrics").text) for s in family.samples}


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.mark.parametrize("model_threads", [1, 2])
def test_concurrent_requests_share_a_batch_and_get_their_own_answers(server_settings, checkpoints_root,
                                                                      video_files, model_threads):
    # two model threads: batches of at most 4, so both threads run one (side by side when they overlap)
    settings = server_settings(decode_workers=2, max_wait_ms=300, max_batch_size=8 // model_threads,
                               model_threads=model_threads)
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda clip: post(client, clip, max_new_tokens=6), video_files))
        metrics = samples(client)
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    assert metrics[("capguard_batch_size_sum", ())] == 8
    assert metrics[("capguard_batch_size_count", ())] < 8          # at least one batch held several videos

    # each answer belongs to its own upload: hash, frame indices, and the caption a lone call gives
    stack = load_stack(checkpoints_root / "demo", device="cpu")

    def alone(clip):
        frames = sample_frames(clip, 8, max_side=stack.frame_side).frames
        return stack.caption([frames], max_new_tokens=[6])[0][0]

    # a worker thread, like the server's model thread (torch's main thread can be far slower on a busy CPU)
    with ThreadPoolExecutor(1) as thread:
        references = list(thread.map(alone, video_files))
    for i, (clip, response, reference) in enumerate(zip(video_files, responses, references, strict=True)):
        body = response.json()
        assert body["video_sha256"] == hashlib.sha256(clip.read_bytes()).hexdigest()
        assert body["frames"]["indices"] == sample_indices(12 + 3 * i, 8)
        assert body["caption"] == reference.caption
        assert body["scores"]["siglip"] == pytest.approx(reference.score, abs=1e-4)

    log = CaptionLog(settings.data_dir / "capguard.db")
    assert log.count("demo") == 8
    log.close()


def test_a_phone_portrait_upload_is_captioned_upright(server_settings, checkpoints_root, tmp_path):
    from videomaker import make_video

    # a portrait phone clip: landscape frames plus "turn a quarter clockwise" in the mp4 track header
    turned = Path(make_video(tmp_path / "portrait.mp4", num_frames=16, size=(96, 64), rotation=-90))
    with TestClient(create_app(server_settings())) as client:
        response = post(client, turned, max_new_tokens=6)
    assert response.status_code == 200, response.text
    stack = load_stack(checkpoints_root / "demo", device="cpu")
    upright = sample_frames(turned, 8, max_side=stack.frame_side).frames     # (8, H, W, 3)
    assert upright.shape[1] > upright.shape[2]                                # portrait
    with ThreadPoolExecutor(1) as thread:   # a worker thread, like the server's model thread
        reference = thread.submit(lambda: stack.caption([upright], max_new_tokens=[6])[0][0]).result()
    assert response.json()["caption"] == reference.caption
    assert response.json()["scores"]["siglip"] == pytest.approx(reference.score, abs=1e-4)


def test_full_queue_answers_503_with_retry_after(server_settings, video_files):
    settings = server_settings(queue_size=1, max_wait_ms=0)
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(2) as pool:
        batcher = client.app.state.capguard.batcher
        entered, release = threading.Event(), threading.Event()
        run_batch = batcher.run_batch

        def held(jobs):
            entered.set()
            release.wait(30)
            return run_batch(jobs)

        batcher.run_batch = held
        try:
            first = pool.submit(post, client, video_files[0], max_new_tokens=2)
            assert entered.wait(30)                        # the model thread is busy with the first request
            second = pool.submit(post, client, video_files[1], max_new_tokens=2)
            wait_for(lambda: batcher.depth() == 1)         # ... and the second one fills the queue
            assert samples(client)[("capguard_queue_depth", ())] == 1
            third = post(client, video_files[2], max_new_tokens=2)
            assert third.status_code == 503 and third.json()["error"]["code"] == "queue_full"
            assert int(third.headers["Retry-After"]) >= 1
        finally:
            release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert post(client, video_files[2], max_new_tokens=2).status_code == 200


def test_caption_log_survives_a_restart_and_refills_the_guard(server_settings, video_files, tmp_path):
    settings = server_settings(data_dir=tmp_path / "data")
    with TestClient(create_app(settings)) as client:
        answers = [post(client, clip, max_new_tokens=3).json() for clip in (*video_files[:3], video_files[0])]
    log = CaptionLog(tmp_path / "data" / "capguard.db")
    assert log.count() == 4
    rows = log.recent("demo", 100)
    # one row per video, most recently captioned last; the stored caption is the answered one
    assert [r["video_sha256"] for r in rows] == [a["video_sha256"] for a in answers[1:]]
    assert [r["caption"] for r in rows] == [a["caption"] for a in answers[1:]]
    assert rows[0]["text_emb"].dtype == np.float32 and rows[0]["text_emb"].shape == rows[0]["video_emb"].shape
    assert np.linalg.norm(rows[0]["text_emb"]) == pytest.approx(1.0, abs=1e-4)
    assert rows[0]["siglip"] == pytest.approx(answers[1]["scores"]["siglip"])
    assert log.recent("demo", 100, fingerprint="0" * 64) == []
    log.close()
    assert list((tmp_path / "data" / "tmp").iterdir()) == []

    with TestClient(create_app(server_settings(data_dir=tmp_path / "data"))) as client:
        assert client.app.state.capguard.guards.get("demo").state().window_captions == 3
        assert samples(client)[("capguard_window_captions", (("checkpoint", "demo"),))] == 3
        after = post(client, video_files[3], max_new_tokens=3).json()
        assert after["guard"]["window_captions"] == 4
    log = CaptionLog(tmp_path / "data" / "capguard.db")
    assert log.count("demo") == 5
    log.close()


# ------------------------------------------------------------------------------- collapse policies


def force_one_caption(client, checkpoint: str) -> None:
    """Make a loaded checkpoint answer one caption whatever the video: a collapsed model, made to order."""
    stack = client.app.state.capguard.checkpoints.loaded(checkpoint)
    caption = stack.caption

    def collapsed(videos, **kwargs):
        outputs, stages = caption(videos, **kwargs)
        for out in outputs:
            out.caption = "a grey building seen from the street"
        return outputs, stages

    stack.caption = collapsed


def collapse_settings(server_settings, policy: str):
    return server_settings(collapse_policy=policy, guard_window=10, guard_min_captions=3, admin_token=ADMIN)


def test_flag_policy_serves_and_flags(server_settings, video_files):
    with TestClient(create_app(collapse_settings(server_settings, "flag"))) as client:
        force_one_caption(client, "demo")
        guards = [post(client, clip, max_new_tokens=2).json()["guard"] for clip in video_files[:4]]
        assert [g["status"] for g in guards] == ["warming_up", "warming_up", "collapsed", "collapsed"]
        assert "unique_ratio" in guards[2]["tripped"] and "unique_ratio" in guards[2]["newly_tripped"]
        metrics = samples(client)
        assert metrics[("capguard_collapse_flag", (("checkpoint", "demo"),))] == 1
        assert metrics[("capguard_guard_trips_total", (("checkpoint", "demo"), ("rule", "unique_ratio")))] == 1
        assert metrics[("capguard_window_unique_ratio", (("checkpoint", "demo"),))] == pytest.approx(0.25)
        listed = {c["name"]: c for c in client.get("/checkpoints").json()["checkpoints"]}
        assert listed["demo"]["guard_status"] == "collapsed"


def test_reject_policy_answers_503_for_a_collapsed_checkpoint(server_settings, video_files):
    with TestClient(create_app(collapse_settings(server_settings, "reject"))) as client:
        force_one_caption(client, "demo")
        for clip in video_files[:3]:
            assert post(client, clip, max_new_tokens=2).status_code == 200
        r = post(client, video_files[3], max_new_tokens=2)
        assert r.status_code == 503 and r.json()["error"]["code"] == "checkpoint_collapsed"
        assert int(r.headers["Retry-After"]) > 0
        assert post(client, video_files[3], checkpoint="runs/epoch-1", max_new_tokens=2).status_code == 200


def test_fallback_policy_serves_from_the_last_healthy_checkpoint(server_settings, video_files):
    with TestClient(create_app(collapse_settings(server_settings, "fallback"))) as client:
        auth = {"Authorization": f"Bearer {ADMIN}"}
        assert client.post("/checkpoints/runs/epoch-1/activate", headers=auth).status_code == 200
        force_one_caption(client, "runs/epoch-1")
        served = [post(client, clip, max_new_tokens=2).json()["checkpoint"] for clip in video_files[:3]]
        assert served == ["runs/epoch-1"] * 3                     # the third answer trips the guard
        r = post(client, video_files[3], max_new_tokens=2)
        assert r.status_code == 200 and r.json()["checkpoint"] == "demo"
        named = post(client, video_files[3], checkpoint="runs/epoch-1", max_new_tokens=2)
        assert named.status_code == 503 and named.json()["error"]["code"] == "checkpoint_collapsed"


def test_not_ready_until_a_checkpoint_is_loaded(server_settings, video_files):
    settings = server_settings(default_checkpoint="missing", admin_token=ADMIN)
    with TestClient(create_app(settings)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and "Retry-After" in r.headers
        assert client.get("/healthz").status_code == 200
        r = post(client, video_files[0])
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        auth = {"Authorization": f"Bearer {ADMIN}"}
        assert client.post("/checkpoints/demo/activate", headers=auth).status_code == 200
        assert client.get("/readyz").status_code == 200
        assert post(client, video_files[0], max_new_tokens=2).status_code == 200
