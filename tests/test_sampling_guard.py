"""The guard stays sound when clients sample (issue 15, section 1), on the shipped checkpoints and val videos.

Clients ask for do_sample=true, temperature=1.0 and the sampled captions share the guard's one window
with greedy ones (the measured decision of tests/test_guard_sampling.py). Here the whole serving path below
the HTTP layer runs for real: the request's decoding options (capguard.models.decoding), per-row seeded
sampling inside batched generate (capguard.models.sampling), the scorer's embeddings, and the guard built
the way the server builds it (the checkpoint's own guard section applied). Slow: ~400 sampled captions.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from capguard.models.decoding import DecodingRequest
from capguard.models.evaluate import load_dataset
from capguard.models.stack import ComponentCache, load_stack
from capguard.models.video import VideoLimits, sample_frames
from capguard.server.guard import GuardRegistry

ROOT = Path(__file__).resolve().parents[1]
SAMPLED = DecodingRequest(do_sample=True, temperature=1.0)
BATCH = 8


@pytest.fixture(scope="module")
def cache():
    return ComponentCache()


@pytest.fixture(scope="module")
def val_frames(cache):
    """{video id: (T, H, W, 3) frames} of samples/val, decoded once as the server would for the demo stack
    (the collapsed one shares its encoder, so its frame count and size)."""
    stack = load_stack(ROOT / "checkpoints" / "demo", device="cpu", cache=cache)
    items = load_dataset(ROOT / "samples" / "val" / "val.jsonl").items
    return {it.id: sample_frames(it.path, stack.config.num_frames, VideoLimits(), max_side=stack.frame_side).frames
            for it in items}


def serve_sampled(name: str, cache, frames: dict, order: list[str]):
    """Caption `order` (video ids) with checkpoint `name`, each request sampled with its own drawn seed, in
    batches of BATCH; yields the guard state after each caption."""
    stack = load_stack(ROOT / "checkpoints" / name, device="cpu", cache=cache)
    guard = GuardRegistry().configure(name, stack.config.guard)   # as server/state.py restore_guard does
    for first in range(0, len(order), BATCH):
        ids = order[first:first + BATCH]
        gens = [SAMPLED.apply(stack.config.generation) for _ in ids]   # one request each: its own seed
        outputs, _ = stack.caption([frames[i] for i in ids], generation=gens)
        for video_id, out in zip(ids, outputs, strict=True):
            yield out, guard.observe(video_id, out.caption, out.text_emb, out.video_emb, out.score)


@pytest.mark.slow
def test_collapsed_checkpoint_sampled_at_temperature_1_is_flagged_within_50(val_frames, cache):
    order = list(val_frames)
    random.Random(0).shuffle(order)
    states = [state for _, state in serve_sampled("collapsed", cache, val_frames, order[:50])]
    flagged = [i + 1 for i, s in enumerate(states) if s.status == "collapsed"]
    assert flagged, f"not flagged in 50 sampled captions; last figures: {states[-1].to_dict()}"
    first = states[flagged[0] - 1]
    logging.getLogger(__name__).info("collapsed, sampled: flagged at caption %d by %s; unique %.2f, R@1 %s",
                                     flagged[0], first.tripped, first.unique_ratio, first.grounding_r1)


@pytest.mark.slow
def test_healthy_demo_sampled_at_temperature_1_is_never_flagged_over_3_shuffled_passes(val_frames, cache):
    ids = list(val_frames)
    order = []
    for seed in range(3):
        shuffled = ids[:]
        random.Random(100 + seed).shuffle(shuffled)
        order += shuffled
    captions, worst = set(), None
    for out, state in serve_sampled("demo", cache, val_frames, order):
        captions.add(out.caption)
        assert state.status != "collapsed", f"demo flagged ({state.tripped}) after sampled captions: {state.to_dict()}"
        worst = state
    assert worst.status == "ok" and len(captions) > 97    # sampled: repeats of a video get other wordings
    logging.getLogger(__name__).info("demo, sampled, 3 passes: %d distinct captions; last window %s",
                                     len(captions), {k: worst.to_dict()[k] for k in ("unique_ratio",
                                     "near_unique_ratio", "top_mode_share", "grounding_r1")})
