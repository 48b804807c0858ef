"""The throughput changes keep behaviour: exact preprocessing, prepared inputs, prompt cache, batch patience."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from models.components import init_checkpoint
from models.encoder import FramePreprocessor
from models.stack import Prepared, load_stack
from server.batcher import Batcher, Later


def reference_preprocess(pre: FramePreprocessor, frames: torch.Tensor) -> torch.Tensor:
    """FramePreprocessor.forward as first written (strided channels-last resize): the ground truth."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[-2:]
    th, tw = pre.size
    if pre.resize_mode == "squash":
        new_h, new_w = th, tw
    else:
        scale = max(th / h, tw / w) if pre.resize_mode == "shortest" else min(th / h, tw / w)
        new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):
        mode = "bicubic" if pre.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False).clamp_(0, 1)
    if pre.resize_mode == "longest":
        x = F.pad(x, (0, tw - new_w, 0, th - new_h))
    top, left = (x.shape[-2] - th) // 2, (x.shape[-1] - tw) // 2
    return (x[..., top:top + th, left:left + tw] - pre.mean) / pre.std


@pytest.mark.parametrize("mode", ["squash", "shortest", "longest"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("frame_hw", [(72, 128), (64, 64), (30, 20)])
def test_frame_preprocessing_is_bit_identical_to_the_reference(mode, interpolation, frame_hw):
    pre = FramePreprocessor({"size": 64, "resize_mode": mode, "interpolation": interpolation,
                             "mean": [0.48, 0.45, 0.40], "std": [0.26, 0.26, 0.27]})
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, *frame_hw, 3), dtype=np.uint8))
    assert torch.equal(pre(frames), reference_preprocess(pre, frames))


@pytest.fixture(scope="module")
def stack_dirs(tmp_path_factory):
    """A stack whose scorer shares the captioner's tower, and one whose scorer is a separate model."""
    root = tmp_path_factory.mktemp("perf")
    shared = init_checkpoint(root / "shared", "mlp2x_gelu", seed=3)
    own = root / "own"
    shutil.copytree(shared, own)
    shutil.copytree(own / "siglip", own / "scorer")
    manifest = json.loads((own / "capguard.json").read_text())
    manifest["scorer"]["path"] = "scorer"
    (own / "capguard.json").write_text(json.dumps(manifest))
    return {"shared": shared, "own": own}


def sensitized(directory):
    """Widen random-init weights so each video gets its own tokens (see tests/test_stack.py)."""
    stack = load_stack(directory, device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in stack.captioner.projector.parameters():
            p.normal_(0, 0.3)
        for p in stack.captioner.llm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return stack


def clips(seed: int, sizes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8) for t, h, w in sizes]


@pytest.mark.parametrize("scorer", ["shared", "own"])
def test_prepared_inputs_caption_exactly_like_raw_frames(stack_dirs, scorer):
    stack = sensitized(stack_dirs[scorer])
    assert (stack.scorer_preprocess is None) == (scorer == "shared")
    videos = clips(1, [(8, 40, 56)] * 3)
    raw, _ = stack.caption(videos, max_new_tokens=[8, 8, 8])
    prepared = [stack.prepare(v) for v in videos]
    assert all(isinstance(p, Prepared) and p.num_frames == 8 for p in prepared)
    assert (prepared[0].scorer_pixels is None) == (scorer == "shared")
    fast, _ = stack.caption(prepared, max_new_tokens=[8, 8, 8])
    assert [o.token_ids for o in fast] == [o.token_ids for o in raw]
    assert len({tuple(o.token_ids) for o in raw}) > 1        # the videos really differ
    assert [o.score for o in fast] == [o.score for o in raw]
    for a, b in zip(fast, raw, strict=True):
        np.testing.assert_array_equal(a.video_emb, b.video_emb)


def test_a_batch_may_mix_frame_sizes_and_counts(stack_dirs):
    """Raw frames of different sizes once failed the whole batch (one resize call for all of them)."""
    stack = sensitized(stack_dirs["own"])
    videos = clips(2, [(8, 40, 56), (8, 48, 48), (3, 72, 128)])
    mixed = [videos[0], stack.prepare(videos[1]), videos[2]]
    for batch in (videos, mixed):
        together, _ = stack.caption(batch, max_new_tokens=[6, 6, 6])
        alone = [stack.caption([v], max_new_tokens=[6])[0][0] for v in videos]
        assert [o.token_ids for o in together] == [o.token_ids for o in alone]
        assert [o.score for o in together] == pytest.approx([o.score for o in alone], abs=1e-5)


def test_prompt_embeddings_are_cached_at_inference_only(stack_dirs):
    cap = load_stack(stack_dirs["shared"], device="cpu", with_scorer=False).captioner
    with torch.inference_mode():
        first = cap.prompt_embeddings()
        assert cap.prompt_embeddings()[0] is first[0]                 # reused, not recomputed
    embedding = cap.llm.get_input_embeddings().weight
    with torch.no_grad():
        embedding.add_(1.0)                                            # an optimizer step does this in place
    with torch.inference_mode():
        after = cap.prompt_embeddings()
    assert after[0] is not first[0] and torch.equal(after[0], first[0] + 1.0)
    trained = cap.prompt_embeddings()                                  # autograd on: fresh, with a graph
    assert trained[0].requires_grad and trained[0] is not after[0]


def run_jobs(batcher: Batcher, delays_s: list[float]) -> list[str]:
    """Submit job i after delays_s[i] seconds (from the start); results in submission order."""
    async def main():
        batcher.start()
        try:
            async def one(i, delay):
                await asyncio.sleep(delay)
                return await batcher.submit(f"job{i}", "k")
            return await asyncio.gather(*(one(i, d) for i, d in enumerate(delays_s)))
        finally:
            batcher.stop()
    return asyncio.run(main())


def test_a_batch_smaller_than_the_recent_ones_waits_for_company():
    batches = []

    def run_batch(jobs):
        batches.append(list(jobs))
        time.sleep(0.4)   # a model call: the recent ones took 0.4 s, patience 0.25 * 0.4 = 0.1 s
        return jobs

    batcher = Batcher(run_batch, max_batch_size=4, max_wait_s=0.0, queue_size=16, expect_more=lambda: False)
    batcher._remember(0.4, 4)          # busy history: batches of 4
    assert batcher.patience_s() == pytest.approx(0.1)
    run_jobs(batcher, [0.0, 0.05])
    assert batches == [["job0", "job1"]]   # job1 came 50 ms later, nobody announced it, it still joined


def test_a_lone_client_never_waits():
    batches = []
    batcher = Batcher(lambda jobs: batches.append(list(jobs)) or jobs, max_batch_size=4, max_wait_s=0.0,
                      queue_size=16, expect_more=lambda: False)
    batcher._remember(0.4, 1)          # lone-client history: batches of 1, patience 0.1 s
    run_jobs(batcher, [0.0, 0.05])
    assert batches == [["job0"], ["job1"]]


def test_follow_ups_run_off_the_model_thread_in_order_and_fail_alone():
    import threading

    finished, model_calls = [], []
    slow_follow_up = threading.Event()

    def finish(job):
        if job == "job0" and not slow_follow_up.wait(5):   # set by the model thread's next batch
            raise AssertionError("the model thread waited for a follow-up before its next batch")
        if job == "job2":
            raise ValueError("guard exploded")
        finished.append((job, threading.current_thread().name))
        return job.upper()

    def run_batch(jobs):
        model_calls.append(list(jobs))
        if len(model_calls) == 2:
            slow_follow_up.set()                # reached only if batch 2 ran while job0's follow-up waited
        return [Later(lambda job=job: finish(job)) for job in jobs]

    batcher = Batcher(run_batch, max_batch_size=2, max_wait_s=0.0, queue_size=16, expect_more=lambda: False,
                      name="model")

    async def main():
        batcher.start()
        try:
            first = asyncio.gather(batcher.submit("job0", "k"), batcher.submit("job1", "k"))
            await asyncio.sleep(0.05)
            second = asyncio.gather(batcher.submit("job2", "k"), batcher.submit("job3", "k"),
                                    return_exceptions=True)
            return await first, await second
        finally:
            batcher.stop()

    first, second = asyncio.run(main())
    assert first == ["JOB0", "JOB1"]
    assert isinstance(second[0], ValueError) and second[1] == "JOB3"
    assert [job for job, _ in finished] == ["job0", "job1", "job3"]          # batch order
    assert {thread for _, thread in finished} == {"model-after_0"}
    assert len(model_calls) == 2


def test_the_server_batches_uploads_of_different_frame_sizes_together(server_settings, tmp_path):
    from videomaker import make_video

    from server.app import create_app

    paths = [make_video(tmp_path / f"v{i}.mp4", num_frames=12, size=size)
             for i, size in enumerate([(64, 48), (48, 64), (96, 54), (64, 48)])]

    def post(client, path):
        with open(path, "rb") as f:
            return client.post("/caption", files={"video": ("v.mp4", f.read(), "video/mp4")},
                               data={"max_new_tokens": "3"})

    with TestClient(create_app(server_settings(decode_workers=2, max_wait_ms=500))) as client, \
            ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda p: post(client, p), paths))
        metrics = client.get("/metrics").text
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    count = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("capguard_batch_size_count"))
    assert count < 4                   # some of the differently sized uploads shared a batch
    assert all(r.json()["timings_ms"]["encode"] > 0 for r in responses)
