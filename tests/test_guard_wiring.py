"""Issue 15 sections 2-3 in the serving side: loops per caption (response, counter, log, the window's
degenerate_share rule), content-unique and Vendi figures in the live guard, gauges and restore."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from capguard.server.app import create_app
from capguard.server.guard import Guard, GuardSettings
from capguard.server.storage import CaptionLog
from tests.paraphrases import paraphrase_stream
from tests.test_server_batching import post, samples

LOOP = "{i}층 건물을 보여주는 영상입니다. {i}층 건물을 보여주는 영상입니다. {i}층 건물을 보여주는"


def test_looping_captions_fill_their_own_rule():
    guard = Guard("c", GuardSettings(window=20, min_captions=10, content_keys=False))
    for i in range(10):
        state = guard.observe(f"v{i}", f"caption number {i} about something else entirely", looping=i < 2)
    assert state.degenerate_share == pytest.approx(0.2) and "degenerate_share" in state.tripped
    assert state.content_unique_ratio is None and state.thresholds["max_degenerate_share"] == 0.1
    restored = Guard("c", GuardSettings(window=20, min_captions=10, content_keys=False)).restore(
        [{"video_sha256": f"v{i}", "caption": f"caption number {i} about something else entirely", "looping": i < 2}
         for i in range(10)])
    assert restored.to_dict() == state.to_dict()


@pytest.mark.slow
def test_content_unique_flags_a_paraphrase_stream_and_vendi_is_reported():
    """kiwipiepy loads here (~7-10 s): the re-worded generic sentence trips content_unique_ratio."""
    rng = np.random.default_rng(0)
    guard = Guard("c", GuardSettings())
    for i, caption in enumerate(paraphrase_stream(60)):
        emb = rng.normal(size=16).astype(np.float32)
        state = guard.observe(f"v{i}", caption, emb / np.linalg.norm(emb), emb / np.linalg.norm(emb), 0.5)
    assert state.content_unique_ratio < 0.5 and "content_unique_ratio" in state.tripped
    assert state.unique_ratio > 0.5          # exact counting sees 60 different sentences
    assert state.vendi is not None and 1.0 <= state.vendi <= 60


def test_a_looping_caption_is_answered_counted_logged_and_judged(server_settings, video_files):
    settings = server_settings(guard_window=10, guard_min_captions=3, guard_content_keys=False)
    with TestClient(create_app(settings)) as client:
        stack = client.app.state.capguard.checkpoints.loaded("demo")
        caption, counter = stack.caption, iter(range(100))

        def looping(videos, **kwargs):
            outputs, stages = caption(videos, **kwargs)
            for out in outputs:
                out.caption = LOOP.format(i=next(counter))
            return outputs, stages

        stack.caption = looping
        answers = [post(client, clip, max_new_tokens=8).json() for clip in video_files[:4]]
        assert answers[0]["degenerate"]["kind"] == "repeated_sentence"
        assert answers[0]["degenerate"]["repeats"] >= 2 and "건물" in answers[0]["degenerate"]["text"]
        assert answers[-1]["guard"]["degenerate_share"] == 1.0
        assert "degenerate_share" in answers[-1]["guard"]["tripped"]
        counted = samples(client)
        assert counted[("capguard_degenerate_captions_total", (("checkpoint", "demo"),
                                                               ("kind", "repeated_sentence")))] == 4
        assert counted[("capguard_window_degenerate_share", (("checkpoint", "demo"),))] == 1.0
        history = client.get("/checkpoints/demo/guard/history").json()
        assert history["points"][-1]["degenerate_share"] == 1.0
    log = CaptionLog(settings.data_dir / "capguard.db")
    rows = log.recent("demo", 10)
    log.close()
    assert all(r["looping"] and r["degenerate"]["kind"] == "repeated_sentence" for r in rows)
    with TestClient(create_app(settings)) as client:   # restored from the log: still judged looping
        assert client.get("/checkpoints/demo/guard").json()["degenerate_share"] == 1.0
