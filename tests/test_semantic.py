"""Content over form (kiwipiepy content morphemes) and meaning (Vendi score): models/semantic.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from capguard.models.diversity import unique_ratio
from capguard.models.semantic import (
    RunningVendi,
    content_key,
    content_morphemes,
    content_unique_ratio,
    vendi_score,
)
from tests.paraphrases import paraphrase_stream

DATA = Path(__file__).parent / "data"
# Tests that analyse Korean load kiwipiepy first: ~5 s on an idle 2-core box, 10-20 s on a busy one.
needs_kiwi = pytest.mark.slow


@needs_kiwi
def test_particles_endings_spacing_and_order_do_not_change_the_content_key():
    same = ["도시의 풍경을 보여주는 영상입니다.", "도시 풍경을 보여주는 영상이다", "영상은 도시의 풍경을 보여준다.",
            "이 영상은 도시 풍경을 보여줍니다", "도시의풍경을 보여주는 영상"]
    assert {content_key(c) for c in same} == {"도시 보이다 영상 풍경"}
    assert content_morphemes("이 영상은 도심의 풍경을 담고 있다.") == ["영상", "도심", "풍경", "담다"]


@needs_kiwi
def test_content_words_do_change_it():
    # one content word apart: the field report's 풍경/광경 pair and two demo captions one attribute apart
    assert content_key("맑고 화창한 낮의 풍경을 담은 영상") != content_key("맑고 화창한 낮의 광경을 담은 영상")
    assert content_key("낮, 홀로 선 빨간 문의 5층 베이지색 평지붕 건물을 줌인한 영상") != \
        content_key("낮, 홀로 선 빨간 문의 5층 베이지색 기와지붕 건물을 줌인한 영상")
    assert content_key("도시 풍경") != content_key("도심 풍경")   # synonyms: the semantic figure's job
    assert content_key("a man is walking") == "a is man walking"   # no morphology for English: words


@needs_kiwi
def test_paraphrase_stream_is_varied_in_form_and_one_in_content():
    stream = paraphrase_stream(97)
    assert len(set(stream)) == 97 and unique_ratio(stream) == 1.0   # exact counting sees 97 captions
    assert content_unique_ratio(stream) < 0.2                      # content: a dozen keys (2 places x 2 scenes x
    assert content_unique_ratio([]) != content_unique_ratio([])    # verbs); nan on no captions
    with pytest.raises(TypeError):
        content_unique_ratio("one caption")


@needs_kiwi
def test_recorded_demo_captions_keep_their_content_apart():
    rows = [json.loads(line) for line in (DATA / "val-captions-demo.jsonl").read_text().splitlines()]
    for p in range(4):
        captions = [r["caption"] for r in rows if r["pass"] == p]
        assert content_unique_ratio(captions) == pytest.approx(unique_ratio(captions), abs=0.03)


def primal_vendi(x: np.ndarray) -> float:
    """Reference: exp entropy of the eigenvalues of K = X X^T / n (n, n), the definition."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    eig = np.linalg.eigvalsh(x @ x.T / len(x))
    eig = eig[eig > 1e-12]
    return float(np.exp(-(eig * np.log(eig)).sum()))


@pytest.mark.parametrize("n, d", [(5, 16), (40, 8), (100, 64)])
def test_vendi_dual_form_equals_the_primal(n, d):
    x = np.random.default_rng(n).standard_normal((n, d))
    assert vendi_score(x) == pytest.approx(primal_vendi(x), rel=1e-9)


def test_vendi_worked_examples():
    assert vendi_score(np.ones((4, 3))) == pytest.approx(1.0)
    assert vendi_score(np.eye(3)) == pytest.approx(3.0)
    assert vendi_score(np.eye(3)[[0, 0, 1, 1]]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        vendi_score(np.array([[np.nan, 1.0]]))


def test_running_vendi_follows_a_window():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((150, 32))
    running = RunningVendi(32)
    for i in range(120):
        running.add(x[i])
        if i >= 100:
            running.remove(x[i - 100])
    for i in range(120, 150):
        running.replace(x[i - 100], x[i])
    assert running.n == 100 and running.score() == pytest.approx(vendi_score(x[50:]), rel=1e-9)
    running.reset(x[:10])
    assert running.score() == pytest.approx(vendi_score(x[:10]))
    for i in range(10, 150):   # queued past FLUSH_ROWS without a score: folded in on the way, same figure
        running.replace(x[i - 10], x[i])
    assert running.n == 10 and running.score() == pytest.approx(vendi_score(x[140:]), rel=1e-6)
    with pytest.raises(ValueError):
        running.add(np.ones(5))
