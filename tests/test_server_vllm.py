"""The server with the vllm engine (make test-vllm: .venv-vllm, a loopback-only network namespace; skipped elsewhere).

One app for the module (one engine-core start, ~11 s on a CPU) on the shipped demo stack: val videos posted
concurrently get the captions of HF's one-by-one loop, with metrics and guard; demo and collapsed share one
engine process; a client that goes away is aborted in vLLM; the app's shutdown leaves no child process.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from capguard.models.config import GenerationConfig

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
VIDEOS = 8


def _children() -> set[int]:
    """Pids of this process's live children (Linux /proc)."""
    mine, found = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == mine and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def videos() -> list[Path]:
    rows = [json.loads(line) for line in (ROOT / "samples" / "val" / "val.jsonl").read_text().splitlines()]
    return [ROOT / "samples" / "val" / row["path"] for row in rows[:VIDEOS]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(TestClient, app, child pids before the app) of a running vllm-engine app on checkpoints/demo."""
    from fastapi.testclient import TestClient

    from capguard.server.app import create_app
    from capguard.server.settings import Settings

    before = _children()
    settings = Settings(checkpoints_root=ROOT / "checkpoints", default_checkpoint="demo", engine="vllm",
                        data_dir=tmp_path_factory.mktemp("data"), device="cpu", decode_workers=1)
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app, before


def _post(client, path: Path, **data):
    with path.open("rb") as f:
        return client.post("/caption", files={"video": (path.name, f, "video/mp4")}, data=data)


def test_concurrent_captions_equal_hf_one_by_one(served, videos):
    from capguard.models.stack import load_stack
    from capguard.models.video import VideoLimits, sample_frames

    client, app, _ = served
    stack = app.state.capguard.checkpoints.loaded("demo")
    assert stack.engine_name == "vllm" and stack.engine.continuous
    with ThreadPoolExecutor(len(videos)) as pool:
        answers = list(pool.map(lambda v: _post(client, v), videos))
    assert [a.status_code for a in answers] == [200] * len(videos), [a.text for a in answers]
    hf = load_stack(ROOT / "checkpoints" / "demo", device="cpu", engine="hf")
    want = [hf.caption([sample_frames(v, hf.config.num_frames, VideoLimits(), max_side=hf.frame_side).frames])[0][0]
            for v in videos]
    got = [a.json() for a in answers]
    assert [g["caption"] for g in got] == [w.caption for w in want]
    for g, w in zip(got, want, strict=True):
        assert g["scores"]["siglip"] == pytest.approx(w.score, abs=1e-4)
        assert g["timings_ms"]["generate"] > 0 and g["guard"]["window_captions"] >= 1
    metrics = client.get("/metrics").text
    import vllm

    assert f'capguard_engine_info{{checkpoint="demo",engine="vllm",version="{vllm.__version__}"}} 1.0' in metrics
    assert f'capguard_captions_total{{checkpoint="demo"}} {float(len(videos))}' in metrics
    assert client.get("/readyz").status_code == 200
    assert app.state.capguard.generating == 0


def test_checkpoints_sharing_an_llm_share_one_engine_process(served, videos):
    """collapsed and c-abstractor/epoch-1 share checkpoints/shared/llm (demo has its own): one engine core for both."""
    client, app, _ = served
    state = app.state.capguard
    children = _children()
    for name in ("collapsed", "c-abstractor/epoch-1"):
        answer = _post(client, videos[0], checkpoint=name)
        assert answer.status_code == 200, answer.text
    collapsed, epoch = state.checkpoints.loaded("collapsed"), state.checkpoints.loaded("c-abstractor/epoch-1")
    assert collapsed.engine_name == epoch.engine_name == "vllm" and collapsed.engine.core is epoch.engine.core
    assert collapsed.engine.core is not state.checkpoints.loaded("demo").engine.core
    assert len(_children() - children) == 1   # one new engine core, not two
    assert client.get("/checkpoints/collapsed/guard").json()["window_captions"] >= 1


@dataclass
class _Long(GenerationConfig):
    """A generation config that cannot stop before ``min_new_tokens`` (vLLM's min_tokens)."""
    max_new_tokens: int = 200
    min_new_tokens: int = 200


def test_disconnect_aborts_the_request_in_vllm(served, videos):
    from capguard.models.video import sample_frames
    from capguard.server.captioning import CaptionJob, cancel_on_disconnect, submit
    from capguard.server.errors import ApiError

    client, app, _ = served
    state = app.state.capguard
    stack = state.checkpoints.loaded("demo")
    video = sample_frames(videos[0], stack.config.num_frames, state.limits, max_side=stack.frame_side)
    job = CaptionJob("demo", stack, video.frames, _Long(), "cd" * 32, 1.0)   # the job's own decoding: long
    engine, aborted = stack.engine, []
    real_abort = engine.abort

    async def spy(request_id: str) -> None:
        aborted.append(request_id)
        await real_abort(request_id)

    async def scenario():
        async def receive():   # the client hangs up while its (long) caption is being generated
            while state.generating == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
            return {"type": "http.disconnect"}

        started = time.perf_counter()
        with pytest.raises(ApiError) as caught:
            await cancel_on_disconnect(receive, submit(state, job))
        return caught.value, time.perf_counter() - started

    engine.abort = spy
    try:
        error, seconds = client.portal.call(scenario)
    finally:
        del engine.abort
    assert error.status == 499 and len(aborted) == 1
    processor = engine.core.llm.output_processor
    deadline = time.monotonic() + 60   # generous: a loaded CI box
    while processor.get_num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processor.get_num_unfinished_requests() == 0   # vLLM dropped it
    assert state.generating == 0
    assert _post(client, videos[1]).status_code == 200


def test_shutdown_leaves_no_engine_process(tmp_path, videos):
    """A second app, closed here: its engine core and decoders end with it (a fresh component cache)."""
    from fastapi.testclient import TestClient

    from capguard.server.app import create_app
    from capguard.server.settings import Settings

    before = _children()
    settings = Settings(checkpoints_root=ROOT / "checkpoints", default_checkpoint="demo", engine="vllm",
                        data_dir=tmp_path, device="cpu", decode_workers=1)
    app = create_app(settings)
    with TestClient(app) as client:
        assert _post(client, videos[0]).status_code == 200
        started = _children() - before
        assert started   # decoders and the engine core
    deadline = time.monotonic() + 60
    while _children() & started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (_children() & started), f"processes outlived the app: {_children() & started}"


def test_what_vllm_cannot_decode_is_a_422_before_the_engine(served, videos):
    """Beam search on a vllm checkpoint: the request is refused (422, the engine named), not failed in the
    engine as a 503, and the engine serves on."""
    client, _, _ = served
    bad = _post(client, videos[0], num_beams="3")
    assert bad.status_code == 422 and "beam search" in bad.json()["error"]["message"], bad.text
    assert _post(client, videos[0]).status_code == 200


def test_an_evaluation_job_runs_on_the_vllm_engine(served):
    """POST /evaluations on a vllm server: the job process loads its stacks with the server's engine (its own
    engine core) and finishes with a row per checkpoint."""
    client, app, _ = served
    r = client.post("/evaluations", json={"checkpoints": ["demo", "collapsed"], "dataset": "val/val.jsonl",
                                          "limit": 6})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 600
    while (job := client.get(f"/evaluations/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["status"] == "succeeded", job["error"]
    assert [row["name"] for row in job["report"]["checkpoints"]] == ["demo", "collapsed"]
    assert all(row["n"] == 6 for row in job["report"]["checkpoints"])
    log = (Path(app.state.capguard.settings.data_dir) / "evaluations" / job_id / "job.log").read_text()
    assert "engine vllm" in log
