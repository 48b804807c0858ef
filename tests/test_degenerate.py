"""Loops inside one caption (models/degenerate.py): real-looking looping outputs, and no false positives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from capguard.models.degenerate import KINDS, degeneration, units

DATA = Path(__file__).parent / "data"
VAL = Path(__file__).parents[1] / "samples" / "val" / "val.jsonl"


@pytest.mark.parametrize("caption, kind, period, repeats", [
    ("도시의 풍경을 보여주는 영상입니다. 도시의 풍경을 보여주는 영상입니다. 도시의 풍경을 보여주는 영상입니다.",
     "repeated_sentence", 15, 3.0),
    ("맑고 화창한 낮의 풍경. 맑고 화창한 낮의 풍경. 도시", "repeated_sentence", 9, 2.0),
    ("a man is walking a man is walking a man is", "repeated_ngram", 8, 2.75),      # cut mid-copy
    ("도시의 풍경을 보여주는 도시의 풍경을 보여주는 도시의 풍경을", "repeated_ngram", 10, 2.6),
    ("도시의풍경을보여주는도시의 풍경을 보여주는", "repeated_ngram", 10, 2.0),     # spacing does not matter
    ("해질녘 건물 건물 건물 건물 건물 건물", "repeated_ngram", 2, 6.0),
    ("The building, the building, the building, the building.", "repeated_ngram", 4, 4.0),
])
def test_loops_are_found(caption, kind, period, repeats):
    found = degeneration(caption)
    assert found is not None and found.kind == kind
    assert found.period == period and found.repeats == pytest.approx(repeats)
    assert 0.5 < found.coverage <= 1.0 and not found.hit_token_limit
    assert found.to_dict()["kind"] in KINDS


@pytest.mark.parametrize("caption", [
    "반짝반짝 빛나는 도시의 밤 풍경",                 # reduplication: 2 copies of 2 syllables
    "하하하 웃으며 걷는 사람들",                      # 3 copies of 1 syllable
    "천천히 천천히 다가가는 카메라",                   # a doubled adverb (3 syllables)
    "very very tall building at night",
    "낮, 홀로 선 빨간 문의 5층 빨간 평지붕 건물을 줌인한 영상",   # colour word twice, not in a row
    "건물 앞의 건물, 그 뒤의 건물을 보여주는 영상",
    "네. 네.",                                         # a repeated sentence too short to be a loop
    "5.5층 건물. 5.5층 건물 옆의 도로",                 # a decimal point does not end a sentence
    "",
])
def test_natural_repetition_is_not_a_loop(caption):
    assert degeneration(caption, num_tokens=12, max_new_tokens=48) is None


def test_token_limit_alone_and_with_a_loop():
    cut = degeneration("해질녘, 홀로 선 검은 문의 3층 빨간 평지붕 건물을", num_tokens=48, max_new_tokens=48)
    assert cut.kind == "token_limit" and cut.hit_token_limit and cut.period == 0
    loop = degeneration("a man is walking a man is walking a man is", num_tokens=48, max_new_tokens=48)
    assert loop.kind == "repeated_ngram" and loop.hit_token_limit
    assert degeneration("짧은 캡션", num_tokens=5, max_new_tokens=48) is None
    assert degeneration("짧은 캡션", num_tokens=5) is None   # no limit known: never token_limit


def test_units_are_syllables_for_hangul_and_words_otherwise():
    assert units("도시의 풍경. A man is") == ["도", "시", "의", "풍", "경", "a", "man", "is"]
    assert units("5층 건물") == ["5", "층", "건", "물"]
    with pytest.raises(TypeError):
        degeneration(None)


def test_no_false_positive_on_recorded_and_reference_captions():
    rows = [json.loads(line) for name in ("demo", "collapsed")
            for line in (DATA / f"val-captions-{name}.jsonl").read_text().splitlines()]
    refs = [json.loads(line) for line in VAL.read_text().splitlines()]
    assert len(rows) == 2 * 4 * 97
    flagged = [r["caption"] for r in rows if degeneration(r["caption"], r["num_tokens"], r["max_new_tokens"])]
    assert flagged == []   # greedy and sampled (T=1.0) outputs of both shipped checkpoints: no loop, no cut
    for ref in refs:
        assert degeneration(ref["caption_ko"]) is None and degeneration(ref["caption_en"]) is None


def brute_force_tandem(ids) -> tuple[int, int, int]:
    """Reference: every period and start, longest periodic stretch with >= 2 copies (>= 3 for period 1)."""
    best, n = (0, 0, 0), len(ids)
    for p in range(1, n // 2 + 1):
        for start in range(n):
            m = 0
            while start + m + p < n and ids[start + m] == ids[start + m + p]:
                m += 1
            if m >= p and m + p > best[2] and not (p == 1 and m + p < 3):
                best = (p, start, m + p)
    return best


def test_tandem_scan_matches_brute_force():
    from capguard.models.degenerate import _longest_tandem

    rng = np.random.default_rng(0)
    for _ in range(500):
        ids = rng.integers(0, rng.integers(2, 6), rng.integers(2, 40))
        assert _longest_tandem(ids) == brute_force_tandem(ids.tolist()), ids
