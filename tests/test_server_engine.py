"""The server on the engine boundary, with the hf engine (main venv, fast): the continuous path (encode on the
model thread, one engine.generate_one per request, score on the model thread) through an HFEngine flagged
continuous, the disconnect -> abort path, backpressure, /readyz on engine health, the engine info metric,
the engine choice reaching evaluation jobs, and shutdown closing the engine.

The same server with the vllm engine: tests/test_server_vllm.py (make test-vllm).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from capguard.models.engines.hf import HFEngine


class ContinuousHF(HFEngine):
    """The hf engine taking the continuous path (generate_one per request), as the vllm engine does."""

    continuous = True


@pytest.fixture(scope="module")
def app_overrides() -> dict:
    return {"engine": "hf", "max_batch_size": 4}


def _post(client, path, **data):
    with open(path, "rb") as f:
        return client.post("/caption", files={"video": (path.name, f, "video/mp4")}, data=data)


def _captions(client, videos) -> list[dict]:
    with ThreadPoolExecutor(len(videos)) as pool:
        answers = list(pool.map(lambda v: _post(client, v), videos))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return [a.json() for a in answers]


def test_continuous_path_gives_the_batched_paths_captions(client, app, video_files):
    state = app.state.capguard
    stack = state.checkpoints.loaded("demo")
    batched = _captions(client, video_files[:6])
    before = state.metrics.stage_seconds.labels("generate")._sum.get()
    stack.engine = ContinuousHF(stack.captioner)
    try:
        continuous = _captions(client, video_files[:6])
    finally:
        stack.engine = HFEngine(stack.captioner)
    assert [a["caption"] for a in continuous] == [b["caption"] for b in batched]
    for answer in continuous:
        assert answer["timings_ms"]["generate"] > 0 and answer["timings_ms"]["encode"] > 0
        assert answer["guard"]["window_captions"] >= 1
    assert state.metrics.stage_seconds.labels("generate")._sum.get() > before
    assert state.generating == 0   # every request left the engine's count
    rows = state.storage.recent("demo", 100, fingerprint=stack.fingerprint)
    assert len(rows) >= 6


def test_engine_info_metric_names_the_engine(client):
    import transformers

    text = client.get("/metrics").text
    assert f'capguard_engine_info{{checkpoint="demo",engine="hf",version="{transformers.__version__}"}} 1.0' in text


def test_engine_queue_full_answers_503(client, app, video_files):
    state = app.state.capguard
    stack = state.checkpoints.loaded("demo")
    stack.engine = ContinuousHF(stack.captioner)
    state.generating = state.settings.queue_size   # as many requests in the engine as the server takes
    try:
        answer = _post(client, video_files[0])
    finally:
        state.generating = 0
        stack.engine = HFEngine(stack.captioner)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "queue_full"
    assert answer.headers["retry-after"]


def test_disconnect_aborts_the_request_in_the_engine(client, app, video_files):
    """A client gone while its request waits in the engine: 499, the engine's abort stops it, and it serves on."""
    from capguard.server.captioning import CaptionJob, cancel_on_disconnect, submit
    from capguard.server.errors import ApiError

    state = app.state.capguard
    stack = state.checkpoints.loaded("demo")
    engine = ContinuousHF(stack.captioner)
    from capguard.models.video import sample_frames

    video = sample_frames(video_files[0], stack.config.num_frames, state.limits, max_side=stack.frame_side)
    job = CaptionJob("demo", stack, video.frames, replace(stack.config.generation, max_new_tokens=8), "ab" * 32, 1.0)
    aborted = []
    real_abort = engine.abort

    async def spy_abort(request_id: str) -> None:
        aborted.append(request_id)
        await real_abort(request_id)

    engine.abort = spy_abort

    async def scenario():
        async def receive():   # the client hangs up once its request is inside the engine
            while not engine._pending:
                await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

        engine._lock.acquire()   # the model is busy: the request waits in the engine
        try:
            with pytest.raises(ApiError) as caught:
                await cancel_on_disconnect(receive, submit(state, job))
        finally:
            engine._lock.release()
        deadline = time.monotonic() + 60   # the worker thread sees the abort and forgets the request (2 s
        while engine._pending and time.monotonic() < deadline:   # was too short on a loaded CI box)
            await asyncio.sleep(0.01)
        return caught.value

    stack.engine, hf = engine, stack.engine
    try:
        error = client.portal.call(scenario)   # on the app's own event loop, where the batcher answers
        assert error.status == 499 and error.code == "client_closed_request"
        assert len(aborted) == 1 and not engine._pending and not engine._aborted
        assert state.generating == 0
        assert _post(client, video_files[1]).status_code == 200   # the engine serves on
    finally:
        stack.engine = hf


def test_evaluation_jobs_get_the_engine(server_settings, tmp_path):
    from capguard.server.metrics import Metrics
    from capguard.server.state import init_state

    state = init_state(server_settings(engine="hf"), Metrics())
    try:
        assert state.evaluations.engine == "hf" and state.checkpoints.engine == "hf"
    finally:
        state.storage.close()
        state.evaluations.store.close()


def test_shutdown_closes_the_engine(server_settings):
    from fastapi.testclient import TestClient

    from capguard.server.app import create_app

    app = create_app(server_settings(engine="hf"))
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
        engine = app.state.capguard.checkpoints.loaded("demo").engine
        engine.check_health()
    from capguard.models.engines import EngineError

    with pytest.raises(EngineError, match="closed"):
        engine.check_health()


def test_the_model_thread_does_not_idle_while_another_key_waits():
    """A continuous engine's encode and score steps are two keys: a batch of one starts at once when the other
    kind is waiting, instead of idling max_wait for company (which would cost every batch 30 ms)."""
    from capguard.server.batcher import Batcher

    async def main():
        batcher = Batcher(lambda jobs: jobs, max_batch_size=8, max_wait_s=2, queue_size=4, expect_more=lambda: True)
        batcher.start()
        try:
            encode = asyncio.ensure_future(batcher.submit("encode", "demo"))
            score = asyncio.ensure_future(batcher.submit("score", ("demo", "score")))
            first = await asyncio.wait_for(encode, timeout=1)   # no 2 s wait: a score job is queued behind it
            return first, await asyncio.wait_for(score, timeout=5)   # alone: it may wait for company
        finally:
            batcher.stop(timeout_s=0.1)

    assert asyncio.run(main()) == ("encode", "score")


def test_serve_takes_engine_once_at_start_up():
    from capguard.server.cli import build_parser

    assert build_parser().parse_args(["serve", "--engine", "vllm"]).engine == "vllm"
    assert build_parser().parse_args(["serve"]).engine is None   # then CAPGUARD_ENGINE (Settings.engine), else auto
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--engine", "tensorrt"])


def test_a_dead_engine_is_replaced_on_the_next_request(server_settings, video_files):
    """A killed engine (a vLLM engine core gone): /readyz 503, the checkpoint is dropped, the next request reloads it
    with a new engine and is served."""
    from fastapi.testclient import TestClient

    from capguard.server.app import create_app

    app = create_app(server_settings(engine="hf"))
    with TestClient(app) as c:
        checkpoints = app.state.capguard.checkpoints
        dead = checkpoints.loaded("demo").engine
        dead.close()
        answer = c.get("/readyz")
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "engine_unavailable"
        assert checkpoints.loaded("demo") is None
        assert _post(c, video_files[0]).status_code == 200
        assert checkpoints.loaded("demo").engine is not dead
        assert c.get("/readyz").status_code == 200
