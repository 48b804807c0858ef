"""Per-request decoding options through the vllm engine (make test-vllm; skipped elsewhere): each row of a
batch gets its own SamplingParams, a seed reproduces its caption, beam search is refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent


def test_rows_decode_by_their_own_options_and_seeds_reproduce():
    from capguard.models.decoding import DecodingRequest
    from capguard.models.engines import EngineError
    from capguard.models.stack import ComponentCache, load_stack
    from capguard.models.video import VideoLimits, sample_frames

    cache = ComponentCache()
    stack = load_stack(ROOT / "checkpoints" / "demo", device="cpu", cache=cache, engine="vllm")
    hf = load_stack(ROOT / "checkpoints" / "demo", device="cpu", cache=cache, engine="hf")
    videos = [sample_frames(ROOT / "samples" / "val" / f"val-0000{i}.mp4", stack.config.num_frames, VideoLimits(),
                            max_side=stack.frame_side).frames for i in range(2)]
    greedy = stack.config.generation
    sampled = DecodingRequest(do_sample=True, temperature=1.5, seed=7).apply(greedy)
    gens = [greedy, sampled, sampled, replace(sampled, seed=8)]
    frames = [videos[0], videos[1], videos[1], videos[1]]
    with torch.inference_mode():
        out, _ = stack.caption(frames, generation=gens, score=False)
        reference, _ = hf.caption(frames[:1], generation=[greedy], score=False)
    assert out[1].token_ids == out[2].token_ids                    # same seed, same video
    assert out[0].token_ids == reference[0].token_ids              # greedy rows are greedy
    with pytest.raises(EngineError, match="beam search"):
        stack.caption(videos[:1], generation=[replace(greedy, num_beams=3)], score=False)
