"""Per-request decoding options (capguard.models.decoding) and per-row sampling in one generate call
(capguard.models.sampling): the rules, parity with transformers' own sampling, seeds that reproduce."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from capguard.models.components import init_checkpoint
from capguard.models.config import GenerationConfig
from capguard.models.decoding import MAX_SEED, DecodingRequest, effective
from capguard.models.sampling import RowSampler, plan_calls
from capguard.models.stack import load_stack
from tests.test_stack import flat_videos, sensitize

GREEDY = GenerationConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = init_checkpoint(tmp_path_factory.mktemp("decoding") / "linear", "linear", seed=1)
    return sensitize(load_stack(path, with_scorer=False), seed=3)


@pytest.mark.parametrize("fields, needle", [
    ({"temperature": 0.0, "do_sample": True}, "temperature must be > 0"),
    ({"temperature": 9.0, "do_sample": True}, "temperature must be > 0 and <= 5.0"),
    ({"top_p": 0.0, "do_sample": True}, "top_p must be > 0 and <= 1"),
    ({"top_p": 1.5, "do_sample": True}, "top_p must be > 0 and <= 1"),
    ({"top_k": -1, "do_sample": True}, "top_k must be >= 0"),
    ({"num_beams": 0}, "num_beams must be between 1 and 8"),
    ({"num_beams": 9}, "num_beams must be between 1 and 8"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"seed": -1, "do_sample": True}, "seed must be between 0"),
    ({"seed": MAX_SEED + 1, "do_sample": True}, "seed must be between 0"),
    ({"temperature": 0.7}, "temperature needs do_sample=true"),
    ({"seed": 3, "do_sample": False}, "seed needs do_sample=true"),
    ({"do_sample": True, "num_beams": 3}, "num_beams=3 with do_sample=true"),
    ({"stop_on_repetition": True, "repetition_min_count": 1}, "repetition_min_count must be between 2 and 16"),
    ({"stop_on_repetition": True, "repetition_min_pattern_size": 0}, "repetition_min_pattern_size must be between 1"),
    ({"stop_on_repetition": True, "repetition_min_pattern_size": 257}, "repetition_min_pattern_size must be between 1"),
    ({"repetition_min_count": 3}, "repetition_min_count needs stop_on_repetition=true"),
    ({"stop_on_repetition": False, "repetition_min_pattern_size": 4},
     "repetition_min_pattern_size needs stop_on_repetition=true"),
])
def test_invalid_requests_say_what_is_wrong(fields, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        DecodingRequest(**fields).check()


def test_apply_keeps_defaults_and_sets_the_mode():
    beams_default = replace(GREEDY, num_beams=4)
    sampled = DecodingRequest(do_sample=True, temperature=0.7).apply(beams_default)
    assert (sampled.do_sample, sampled.num_beams, sampled.temperature, sampled.max_new_tokens) == (True, 1, 0.7, 12)
    assert isinstance(sampled.seed, int) and 0 <= sampled.seed < 2**53      # drawn, echoed, reproducible
    assert DecodingRequest(do_sample=True, seed=5).apply(GREEDY).seed == 5
    beams = DecodingRequest(num_beams=3).apply(replace(GREEDY, do_sample=True))
    assert (beams.do_sample, beams.num_beams, beams.seed) == (False, 3, None)
    assert DecodingRequest().apply(GREEDY) == GREEDY
    assert effective(GREEDY) == {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
                                 "num_beams": 1, "repetition_penalty": 1.0, "seed": None,
                                 "stop_on_repetition": False, "repetition_min_count": None,
                                 "repetition_min_pattern_size": None}
    assert effective(sampled)["temperature"] == 0.7 and effective(sampled)["seed"] == sampled.seed


def test_plan_calls_groups_rows():
    sampled = replace(GREEDY, do_sample=True, seed=1)
    beams = replace(GREEDY, num_beams=3)
    calls = plan_calls([GREEDY, sampled, beams, GREEDY, replace(beams, max_new_tokens=5)])
    assert [rows for rows, _ in calls] == [[0, 1, 3], [2, 4]]
    assert isinstance(calls[0][1]["logits_processor"][0], RowSampler)
    assert calls[1][1]["num_beams"] == 3
    assert "logits_processor" not in plan_calls([GREEDY, GREEDY])[0][1]    # plain greedy: the call as before


def _visual(stack, levels):
    cap = stack.captioner
    clips = flat_videos(levels)
    return cap.project(cap.visual_tokens(stack.pixels(clips, cap.encoder.preprocess), [len(c) for c in clips]))


def test_one_row_matches_transformers_sampling(stack):
    """RowSampler on one row = transformers' own sampling after torch.manual_seed(seed), token for token."""
    cap = stack.captioner
    gen = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.3, top_k=40, top_p=0.95,
                           repetition_penalty=1.2, seed=1234)
    visual = _visual(stack, [90])
    ours = cap.generate(visual, gen)[0]
    embeds, mask, _, _ = cap.build_inputs(visual)
    torch.manual_seed(1234)
    with torch.inference_mode():
        theirs = cap.llm.generate(inputs_embeds=embeds, attention_mask=mask, pad_token_id=cap.pad_id,
                                  eos_token_id=cap.eos_id, max_new_tokens=12, do_sample=True, temperature=1.3,
                                  top_k=40, top_p=0.95, repetition_penalty=1.2)
    assert ours.token_ids == cap.finish(theirs[0].tolist(), 12).token_ids
    assert ours.num_tokens > 3


def test_a_seed_reproduces_its_caption_whatever_the_batch(stack):
    """Same seed + same video -> same caption, alone or among greedy, other sampled and beam-search rows;
    another seed gives another caption (so the seed really drives it)."""
    seeded = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, seed=77)
    alone = stack.captioner.generate(_visual(stack, [60]), seeded)[0]
    mixed = [GREEDY, replace(seeded, seed=5), seeded, replace(GREEDY, num_beams=2),
             replace(seeded, temperature=0.5, seed=None)]
    batch = stack.captioner.generate(_visual(stack, [200, 60, 60, 30, 120]), mixed)
    assert batch[2].token_ids == alone.token_ids
    others = {tuple(stack.captioner.generate(_visual(stack, [60]), replace(seeded, seed=s))[0].token_ids)
              for s in range(6)}
    assert len(others) > 1
    greedy_alone = stack.captioner.generate(_visual(stack, [200]), GREEDY)[0]
    assert batch[0].token_ids == greedy_alone.token_ids          # a sampled neighbour leaves greedy rows alone


def test_the_hf_engine_one_by_one_path_reproduces_a_seed(stack):
    """HFEngine.generate_one (one prompt at a time) samples a seeded row exactly as the batched path does."""
    import asyncio

    from capguard.models.engines.hf import HFEngine

    seeded = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9, seed=31)
    visual = _visual(stack, [60])
    batched = stack.captioner.generate(visual, seeded)[0]
    one = asyncio.run(HFEngine(stack.captioner).generate_one(stack.captioner.sequence(visual[0]), seeded, "r1"))
    assert one.token_ids == batched.token_ids and one.num_tokens > 3
