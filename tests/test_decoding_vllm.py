"""Per-request decoding options through the vllm engine (make test-vllm; skipped elsewhere): each row of a
batch gets its own SamplingParams, a seed reproduces its caption, beam search is refused; stop_on_repetition is
vLLM's repetition_detection, stops a row where the hf engine does, and is counted by the server."""

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


def test_repeating_tail_is_vllms_repetition_check():
    """capguard.models.sampling.repeating_tail (the hf engine's stop) decides as vLLM's own check does, on
    sequences over a 3-token alphabet (so repeats are common), with the pattern sizes the engine sends."""
    import random

    from vllm.sampling_params import RepetitionDetectionParams
    from vllm.v1.core.sched.utils import check_sequence_repetition

    from capguard.models.sampling import repeating_tail

    rng, stops = random.Random(0), 0
    for _ in range(3000):
        ids = [rng.randrange(3) for _ in range(rng.randrange(1, 40))]
        count, smallest = rng.randrange(2, 5), rng.randrange(1, 6)
        params = RepetitionDetectionParams(max_pattern_size=max(smallest, 48 // count), min_pattern_size=smallest,
                                           min_count=count)
        ours = bool(repeating_tail(ids, count, smallest))
        assert ours == check_sequence_repetition(ids, params), (ids, count, smallest)
        stops += ours
    assert 100 < stops < 2900      # both answers were tested many times


def test_stop_on_repetition_is_vllms_repetition_detection(tmp_path):
    """A random-init stack loops on one token: with stop_on_repetition the vllm engine ends the row where the
    hf engine does (same tokens), says "repetition", and without it runs to the limit ("length")."""
    from capguard.models.components import TinySizes, init_checkpoint
    from capguard.models.decoding import DecodingRequest
    from capguard.models.engines.vllm_engine import sampling_params
    from capguard.models.stack import ComponentCache, load_stack

    # the demo LLM's head size (48): one the CPU attention backend takes
    path = init_checkpoint(tmp_path / "loop", "mlp2x_gelu", sizes=TinySizes(llm_hidden=192, llm_layers=3), seed=0)
    cache = ComponentCache()
    stack = load_stack(path, device="cpu", cache=cache, engine="vllm", with_scorer=False)
    hf = load_stack(path, device="cpu", cache=cache, engine="hf", with_scorer=False)
    base = replace(stack.config.generation, max_new_tokens=40)
    stop = DecodingRequest(stop_on_repetition=True).apply(base)
    tuned = DecodingRequest(stop_on_repetition=True, repetition_min_count=3, repetition_min_pattern_size=3).apply(base)
    params = sampling_params(tuned, 40, [1]).repetition_detection
    assert (params.min_count, params.min_pattern_size, params.max_pattern_size) == (3, 3, 13)
    frames = [torch.randint(0, 256, (8, 40, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              .numpy() for i in range(2)]
    with torch.inference_mode():
        out, _ = stack.caption(frames * 3, generation=[base] * 2 + [stop] * 2 + [tuned] * 2, score=False)
        reference, _ = hf.caption(frames * 3, generation=[base] * 2 + [stop] * 2 + [tuned] * 2, score=False)
    assert [o.finish_reason for o in out] == ["length"] * 2 + ["repetition"] * 4
    assert [o.token_ids for o in out] == [o.token_ids for o in reference]
    assert [o.finish_reason for o in reference] == [o.finish_reason for o in out]
    assert out[2].num_tokens < 40 and out[4].num_tokens < out[2].num_tokens


def test_the_server_counts_vllm_repetition_stops(tmp_path):
    """Through the server's continuous path (generate_one per request): the answer says "repetition" and
    capguard_repetition_stops_total{engine="vllm"} counts it; a request without the option runs to the limit."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from capguard.models.components import TinySizes, init_checkpoint
    from capguard.server.app import create_app
    from capguard.server.settings import Settings

    init_checkpoint(tmp_path / "ckpts" / "loop", "mlp2x_gelu", sizes=TinySizes(llm_hidden=192, llm_layers=3), seed=0)
    settings = Settings(checkpoints_root=tmp_path / "ckpts", default_checkpoint="loop", engine="vllm",
                        data_dir=tmp_path / "data", device="cpu", decode_workers=1)
    video = ROOT / "samples" / "val" / "val-00000.mp4"
    with TestClient(create_app(settings)) as client:
        def post(**data):
            with video.open("rb") as f:
                return client.post("/caption", files={"video": (video.name, f, "video/mp4")},
                                   data={"max_new_tokens": "40", **data}).json()

        plain, stopped = post(), post(stop_on_repetition="true")
        metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(client.get("/metrics").text) for s in family.samples}
    assert plain["finish_reason"] == "length" and stopped["finish_reason"] == "repetition"
    assert stopped["decoding"]["stop_on_repetition"] is True
    assert metrics[("capguard_repetition_stops_total", (("checkpoint", "loop"), ("engine", "vllm")))] == 1
