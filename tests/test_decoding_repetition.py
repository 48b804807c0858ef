"""stop_on_repetition (issue 15, section 2): a row whose last tokens repeat ends there, on the hf engine as
vLLM's repetition_detection ends it on the vllm engine (tests/test_decoding_vllm.py); the answer says so
(finish_reason "repetition"), capguard_repetition_stops_total counts it, and the per-caption detector
still judges the cut caption."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from capguard.models.components import init_checkpoint
from capguard.models.config import GenerationConfig
from capguard.models.decoding import DecodingRequest, effective
from capguard.models.degenerate import LOOP_KINDS, degeneration, repetition_stop
from capguard.models.engines.hf import HFEngine
from capguard.models.sampling import RepetitionStop, finish_reason, plan_calls, repeating_tail
from capguard.models.stack import load_stack
from capguard.server.app import create_app
from capguard.server.cli import main
from tests.test_server_batching import post, samples

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 40
GREEDY = GenerationConfig(max_new_tokens=LIMIT)
STOP = replace(GREEDY, stop_on_repetition=True)          # 2 copies of >= 8 tokens


@pytest.mark.parametrize("ids, count, size, expected", [
    ([5, 1, 2, 3, 1, 2, 3], 2, 2, 3),                     # "1 2 3" twice at the end
    ([5, 1, 2, 3, 1, 2, 3], 3, 2, 0),                     # not three times
    ([7, 7, 7, 7], 2, 1, 1),                              # the shortest pattern is reported
    ([7, 7, 7, 7], 2, 2, 2),                              # a one-token loop repeats at every size
    ([7, 7, 7], 2, 2, 0),                                 # too short for two copies of 2
    ([1, 2, 3, 4, 1, 2, 3, 4, 9], 2, 1, 0),               # only the tail counts: a repeat earlier is not a stop
    ([9, 1, 2, 1, 2, 1, 2], 3, 2, 2),
    ([], 2, 1, 0),
])
def test_repeating_tail(ids, count, size, expected):
    assert repeating_tail(ids, count, size) == expected


def test_finish_reason_checks_the_limit_first_like_vllm():
    loop = [1, 2, 3, 4] * 2
    assert finish_reason(replace(STOP, repetition_min_pattern_size=4), loop, LIMIT) == "repetition"
    assert finish_reason(replace(STOP, repetition_min_pattern_size=4), loop, 8) == "length"
    assert finish_reason(STOP, loop, LIMIT) == "stop"                  # 4 tokens < the 8 that count
    assert finish_reason(GREEDY, loop, LIMIT) == "stop"                # the option off: the model's own EOS


def test_the_processor_forces_eos_only_on_rows_that_repeat():
    eos, scores = 0, torch.zeros(3, 10)                                # (B, V)
    scores[:, 4] = 5.0
    ids = torch.tensor([[3, 3, 3, 3], [1, 2, 1, 2], [1, 2, 1, 2]])      # (B, t)
    gens = [replace(STOP, repetition_min_pattern_size=1), GREEDY, replace(STOP, repetition_min_pattern_size=2)]
    out = RepetitionStop(gens, eos)(ids, scores)
    assert out.argmax(-1).tolist() == [eos, 4, eos]
    assert torch.equal(out[1], scores[1])                              # a row without the option is untouched
    beams = RepetitionStop([replace(STOP, repetition_min_pattern_size=2)], eos)(ids, scores)   # one set, all rows
    assert beams.argmax(-1).tolist() == [eos, eos, eos]
    with pytest.raises(ValueError, match="needs the tokenizer's EOS"):
        RepetitionStop([STOP], None)
    calls = plan_calls([GREEDY, STOP, replace(STOP, num_beams=2)], eos)
    assert [type(p).__name__ for p in calls[0][1]["logits_processor"]] == ["RepetitionStop"]
    assert isinstance(calls[1][1]["logits_processor"][0], RepetitionStop) and calls[1][1]["num_beams"] == 2
    assert "logits_processor" not in plan_calls([GREEDY])[0][1]


def test_decoding_request_turns_it_on_and_echoes_it():
    gen = DecodingRequest(stop_on_repetition=True, repetition_min_count=3).apply(GREEDY)
    assert (gen.stop_on_repetition, gen.repetition_min_count, gen.repetition_min_pattern_size) == (True, 3, 8)
    echo = effective(gen)
    assert (echo["stop_on_repetition"], echo["repetition_min_count"], echo["repetition_min_pattern_size"]) == (True, 3, 8)
    assert DecodingRequest(stop_on_repetition=False).apply(STOP).stop_on_repetition is False
    with pytest.raises(ValueError, match="repetition_min_count must be >= 2"):
        GenerationConfig(repetition_min_count=1)


def test_a_checkpoint_may_stop_on_repetition_by_default(tmp_path):
    import json

    from capguard.models.config import CheckpointConfig, CheckpointError

    manifest = json.loads((ROOT / "checkpoints" / "demo" / "capguard.json").read_text())
    manifest["generation"] |= {"stop_on_repetition": True, "repetition_min_pattern_size": 4}
    gen = CheckpointConfig.from_dict(manifest).generation
    assert effective(DecodingRequest().apply(gen))["repetition_min_pattern_size"] == 4
    manifest["generation"]["repetition_min_count"] = 1
    with pytest.raises(CheckpointError, match="repetition_min_count must be >= 2"):
        CheckpointConfig.from_dict(manifest)


@pytest.fixture(scope="module")
def looping(tmp_path_factory):
    """A random-init stack: its greedy caption is one token over and over until max_new_tokens."""
    stack = load_stack(init_checkpoint(tmp_path_factory.mktemp("loop") / "s", "mlp2x_gelu", seed=0),
                       with_scorer=False)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (8, 40, 56, 3), dtype=np.uint8) for _ in range(3)]
    cap = stack.captioner
    with torch.inference_mode():
        visual = cap.project(cap.visual_tokens(stack.pixels(frames, cap.encoder.preprocess), [8, 8, 8]))
    return stack, visual


def test_a_looping_row_stops_early_and_its_neighbours_do_not_change(looping):
    stack, visual = looping
    cap = stack.captioner
    full = cap.generate(visual, GREEDY)
    assert [g.finish_reason for g in full] == ["length"] * 3 and len(set(full[0].token_ids)) == 1   # it loops
    sampled = replace(GREEDY, do_sample=True, temperature=1.5, seed=11)
    mixed = [GREEDY, STOP, replace(STOP, repetition_min_count=3, repetition_min_pattern_size=4)]
    rows = cap.generate(visual, mixed)
    assert rows[0].token_ids == full[0].token_ids and rows[0].finish_reason == "length"
    assert (rows[1].num_tokens, rows[1].finish_reason) == (16, "repetition")      # 2 copies of 8 tokens
    assert (rows[2].num_tokens, rows[2].finish_reason) == (12, "repetition")      # 3 copies of 4 tokens
    assert rows[1].token_ids == full[1].token_ids[:16]                            # the same tokens, cut early
    alone = cap.generate(visual[:1], sampled)[0]
    with_stops = cap.generate(visual, [sampled, STOP, STOP])[0]
    assert with_stops.token_ids == alone.token_ids                                # a seed still reproduces
    beams = cap.generate(visual[:1], replace(STOP, num_beams=2))[0]
    assert (beams.num_tokens, beams.finish_reason) == (16, "repetition")          # beam search stops too
    one = asyncio.run(HFEngine(cap).generate_one(cap.sequence(visual[1]), STOP, "r1"))
    assert (one.token_ids, one.finish_reason) == (rows[1].token_ids, "repetition")   # the one-by-one path


def test_the_detector_still_judges_a_caption_cut_by_the_stop():
    """A Korean sentence loop, token by token through the processor with the demo's tokenizer: it stops after
    the second copy, and the cut caption still reads as a repeated sentence."""
    cap = load_stack(ROOT / "checkpoints" / "demo", with_scorer=False).captioner
    sentence = cap.tokenizer("도시의 풍경을 보여주는 영상입니다. ", add_special_tokens=False)["input_ids"]
    assert len(sentence) >= 8
    stop, vocab = RepetitionStop([STOP], cap.eos_id), len(cap.tokenizer)
    made: list[int] = []
    for token in sentence * 5:                       # what a looping model would write, one step at a time
        if torch.isinf(stop(torch.tensor([made], dtype=torch.long), torch.zeros(1, vocab))).any():   # EOS forced
            made.append(cap.eos_id)
            break
        made.append(token)
    out = cap.finish(made, 128, STOP)                # the demo's byte-level tokenizer: 37 tokens a sentence
    assert out.finish_reason == "repetition" and out.num_tokens == 2 * len(sentence)
    found = degeneration(out.text, out.num_tokens, 128)
    assert found is not None and found.kind == "repeated_sentence" and found.repeats == 2.0
    assert not found.hit_token_limit


@pytest.mark.slow   # ~13 s: an app with its decoder process
def test_the_server_echoes_counts_and_refuses_bad_fields(server_settings, video_files):
    with TestClient(create_app(server_settings())) as client:
        plain = post(client, video_files[0], max_new_tokens=LIMIT).json()
        assert plain["finish_reason"] == "length" and plain["decoding"]["stop_on_repetition"] is False
        r = post(client, video_files[1], max_new_tokens=LIMIT, stop_on_repetition="true").json()
        assert r["finish_reason"] == "repetition"
        assert r["degenerate"]["kind"] in LOOP_KINDS   # a stopped loop is still a loop to the guard
        assert (r["decoding"]["repetition_min_count"], r["decoding"]["repetition_min_pattern_size"]) == (2, 8)
        counted = samples(client)
        key = ("capguard_repetition_stops_total", (("checkpoint", "demo"), ("engine", "hf")))
        assert counted[key] == 1
        for fields, needle in [({"repetition_min_count": "3"}, "needs stop_on_repetition=true"),
                               ({"stop_on_repetition": "true", "repetition_min_count": "1"}, "between 2 and 16"),
                               ({"stop_on_repetition": "often"}, "stop_on_repetition")]:
            bad = post(client, video_files[2], **fields)
            assert bad.status_code == 422 and needle in bad.json()["error"]["message"], bad.text
        assert samples(client)[key] == 1
        stack = client.app.state.capguard.checkpoints.loaded("demo")
        eos, stack.captioner.eos_id = stack.captioner.eos_id, None   # a tokenizer without EOS: no row can end early
        try:
            bad = post(client, video_files[2], stop_on_repetition="true")
        finally:
            stack.captioner.eos_id = eos
        assert bad.status_code == 422 and "has none" in bad.json()["error"]["message"], bad.text


def test_evaluation_bodies_take_the_fields():
    from pydantic import ValidationError

    from capguard.server.schemas import EvaluationRequest

    body = {"checkpoints": ["demo"], "dataset": "clips"}
    asked = EvaluationRequest.model_validate({**body, "stop_on_repetition": True, "repetition_min_count": 3})
    assert asked.decoding().given() == {"stop_on_repetition": True, "repetition_min_count": 3}   # the job's spec
    with pytest.raises(ValidationError, match="repetition_min_pattern_size needs stop_on_repetition=true"):
        EvaluationRequest.model_validate({**body, "repetition_min_pattern_size": 4})


def test_cli_flags(checkpoints_root, video_files, capsys):
    import json

    with pytest.raises(SystemExit) as exit_:
        main(["caption", str(video_files[0]), "--repetition-min-count", "3"])
    assert exit_.value.code == 2 and "needs stop_on_repetition=true" in capsys.readouterr().err
    assert main(["caption", str(video_files[0]), "--checkpoint", str(checkpoints_root / "demo"), "--no-score",
                 "--device", "cpu", "--max-new-tokens", str(LIMIT), "--stop-on-repetition"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["finish_reason"] == "repetition" and record["decoding"]["stop_on_repetition"] is True


def test_a_stop_too_short_for_the_detector_is_still_a_loop_to_the_guard():
    from capguard.server.guard import Guard, GuardSettings

    guard = Guard("g", GuardSettings(window=10, min_captions=4))
    for i in range(4):   # clean-reading captions the engine cut for repeating
        state = guard.observe(f"{i:064x}", f"도시 풍경 {i}", degenerate=repetition_stop().kind)
    assert state.degenerate_share == 1.0 and "degenerate_share" in state.tripped
    rows = [{"video_sha256": f"{i:064x}", "caption": f"도시 풍경 {i}", "decoding": {"finish_reason": "repetition"}}
            for i in range(4)]   # as the caption log gives them back after a restart
    assert Guard("g", GuardSettings(window=10, min_captions=4)).restore(rows).degenerate_share == 1.0


@pytest.mark.slow   # three passes of a random stack over 3 videos: ~8 s
def test_evaluation_reports_count_repetition_stops_as_the_guard_does(tmp_path):
    """An offline evaluation with stop_on_repetition: the report row counts the rows the option cut
    (``repetition_stops``), judges each as a loop as the server's guard does (the cut text may read clean),
    captions.jsonl says why each caption ended, and a Ray Data sweep's worker writes the same report."""
    import json

    from capguard.models.evaluate import Evaluator, load_dataset
    from capguard.models.ray_sweep import SweepPlan, write_report
    from capguard.models.report import detail_table
    from tests.test_ray_sweep import swept_in_process

    checkpoint = init_checkpoint(tmp_path / "loop", "mlp2x_gelu", seed=0)
    dataset = load_dataset(ROOT / "samples" / "val" / "val.jsonl", limit=3)
    rows, reports = {}, {}
    for stop in (False, True):
        decoding = DecodingRequest(stop_on_repetition=stop)
        evaluator = Evaluator(dataset, tmp_path / f"stop-{stop}", batch_size=2, device="cpu", progress_bar=False,
                              max_new_tokens=LIMIT, decoding=decoding)
        rows[stop] = evaluator.add(checkpoint, name="loop")
        reports[stop] = evaluator.write()
    # this stack loops on a token that decodes to nothing: the text alone reads clean (cut at the limit, no loop)
    assert (rows[False]["repetition_stops"], rows[False]["degenerate_share"]) == (0, 0.0)
    assert (rows[True]["repetition_stops"], rows[True]["degenerate_share"]) == (3, 1.0)   # the engine saw the loop
    records = [json.loads(line) for line in (tmp_path / "stop-True" / "captions.jsonl").open(encoding="utf-8")]
    assert [r["finish_reason"] for r in records] == ["repetition"] * 3
    assert "Repetition stops" in detail_table(reports[True]["checkpoints"])
    assert "Repetition stops" not in detail_table(reports[False]["checkpoints"])

    decoding = DecodingRequest(stop_on_repetition=True)
    plan = SweepPlan((str(checkpoint),), tuple(str(i.path) for i in dataset.items), 2, None, LIMIT, "cpu",
                     decoding.given())
    swept = write_report(plan, dataset, swept_in_process(plan), tmp_path / "swept", paths=[str(checkpoint)], names=["loop"])
    row = swept["checkpoints"][0]
    assert (row["repetition_stops"], row["degenerate_share"]) == (3, 1.0)
    assert (tmp_path / "swept" / "captions.jsonl").read_bytes() == (tmp_path / "stop-True" / "captions.jsonl").read_bytes()
